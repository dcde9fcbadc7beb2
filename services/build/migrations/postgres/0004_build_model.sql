-- The build's spec and step results as kiln-build's own model (src/model.rs) in JSON,
-- instead of proto blobs: `spec_json` is a BuildSpec (steps with argv split, env,
-- resolved limits, labels), `step_results_json` a list of StepResult.
-- SQL cannot decode protobuf: rows of earlier releases are filled in by the service
-- itself when it opens the store (src/store/legacy.rs), which also empties their old
-- `spec` and `step_results` blobs. New rows store empty blobs there; the two columns
-- are kept, NOT NULL as they were, so that this migration is only additions.
ALTER TABLE builds ADD COLUMN spec_json TEXT;
ALTER TABLE builds ADD COLUMN step_results_json TEXT;
