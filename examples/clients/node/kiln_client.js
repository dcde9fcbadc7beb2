#!/usr/bin/env node
// A kiln client in Node (@grpc/grpc-js + @grpc/proto-loader): log in, build, stream,
// resume, decode rich errors.
//
// The services are loaded from the repository's proto/ at run time (no generated code).
// Over TLS with the CA file:
//   1. Login as a user (AuthService/Login); the access token goes in
//      `authorization: Bearer …` on every later call;
//   2. CreateWorkspace with a small hello.py;
//   3. StartBuild `python3 hello.py` and WatchBuild it, printing its output live, then
//      drop the stream mid-way (a client that disconnects);
//   4. resume with WatchBuild(after_sequence = last sequence seen) and check that exactly
//      the remaining events arrive: no gap, no duplicate, identical to a full replay;
//   5. send two bad requests (a file path `/etc/passwd`, a step with an empty argv) and
//      decode the `grpc-status-details-bin` trailer: google.rpc.Status with
//      google.rpc.BadRequest field violations and google.rpc.ErrorInfo.
//
// Rich errors: grpc-js hands the trailer over as a Buffer in err.metadata. It is decoded
// with protobufjs using the official google/rpc/status.proto and error_details.proto
// from the `google-proto-files` npm package (googleapis' protos; neither grpc-js nor
// proto-loader ships them), and each google.protobuf.Any detail is decoded by the type
// named in its type_url.
//
// Configuration (environment):
//   KILN_ENDPOINT   host:port (an https:// prefix is accepted), default 127.0.0.1:7443
//   KILN_CA         the CA certificate file (PEM), e.g. <data-dir>/pki/ca.pem
//   KILN_USERNAME   a user with role user (or higher)
//   KILN_PASSWORD   its password
//   KILN_PROTO_DIR  the proto/ directory, default: the repository's, found from this file
//
// Dependencies: package.json here (`make tools` runs `npm ci` in this directory).
// Exits 0 when every check passed, 1 with a `FAIL:` line otherwise.

'use strict';

const fs = require('fs');
const path = require('path');
const crypto = require('crypto');

class CheckFailed extends Error {}

function check(condition, message) {
  if (!condition) throw new CheckFailed(message);
}

function need(name) {
  const value = process.env[name];
  if (!value) throw new CheckFailed(`${name} is not set (see the top of ${path.basename(__filename)})`);
  return value;
}

function requireDeps() {
  try {
    return {
      grpc: require('@grpc/grpc-js'),
      protoLoader: require('@grpc/proto-loader'),
      protobuf: require('protobufjs'),
      googleProtos: require('google-proto-files'),
    };
  } catch (e) {
    throw new CheckFailed(
      `${e.message.split('\n')[0]}: the Node dependencies are missing; run \`make tools\` ` +
        `(it runs \`npm ci\` in ${path.relative(process.cwd(), __dirname) || '.'})`,
    );
  }
}

const HELLO_PY = `import sys
print("hello from kiln", flush=True)
print("a line on stderr", file=sys.stderr, flush=True)
print("goodbye from kiln", flush=True)
`;

// Events of the first watch before it drops the stream: Queued, Started, StepStarted.
const EVENTS_BEFORE_DISCONNECT = 3;
const CALL_TIMEOUT_MS = 30_000;

function deadline() {
  return new Date(Date.now() + CALL_TIMEOUT_MS);
}

async function main() {
  const { grpc, protoLoader, protobuf, googleProtos } = requireDeps();
  const endpoint = (process.env.KILN_ENDPOINT || '127.0.0.1:7443').replace(/^https:\/\//, '');
  const caFile = need('KILN_CA');
  const username = need('KILN_USERNAME');
  const password = need('KILN_PASSWORD');
  const protoDir = path.resolve(process.env.KILN_PROTO_DIR || path.join(__dirname, '..', '..', '..', 'proto'));
  const googleDir = path.dirname(googleProtos.getProtoPath()); // holds google/rpc/…

  // The kiln services, straight from proto/. google/protobuf/* comes with protobufjs.
  const definition = protoLoader.loadSync(
    ['kiln/auth/v1/auth.proto', 'kiln/build/v1/build.proto'],
    { keepCase: true, longs: Number, enums: String, bytes: Buffer, defaults: true, oneofs: true, includeDirs: [protoDir] },
  );
  const kiln = grpc.loadPackageDefinition(definition).kiln;

  // google.rpc.Status and the detail types, for the grpc-status-details-bin trailer.
  const rpcTypes = new protobuf.Root();
  rpcTypes.resolvePath = (_origin, target) => path.join(googleDir, target);
  rpcTypes.loadSync(['google/rpc/status.proto', 'google/rpc/error_details.proto'], { keepCase: true });
  const Status = rpcTypes.lookupType('google.rpc.Status');

  /** Decodes a failed call's rich status: {code, message, info, violations}. */
  function richError(err) {
    const [raw] = err.metadata ? err.metadata.get('grpc-status-details-bin') : [];
    check(raw, `${grpc.status[err.code]} without grpc-status-details-bin: ${err.details}`);
    const status = Status.decode(raw);
    check(status.code === err.code, `google.rpc.Status code ${status.code} differs from the call's ${err.code}`);
    let info = null;
    const violations = [];
    for (const any of status.details) {
      const typeName = any.type_url.slice(any.type_url.lastIndexOf('/') + 1);
      let type;
      try {
        type = rpcTypes.lookupType(typeName);
      } catch {
        continue; // a detail type this client does not know
      }
      const detail = type.toObject(type.decode(any.value), { defaults: true });
      if (typeName === 'google.rpc.ErrorInfo') info = detail;
      if (typeName === 'google.rpc.BadRequest') violations.push(...detail.field_violations);
    }
    return { code: grpc.status[err.code], message: status.message, info, violations };
  }

  let ca;
  try {
    ca = fs.readFileSync(caFile);
  } catch (e) {
    throw new CheckFailed(`KILN_CA: ${e.message}`);
  }
  const credentials = grpc.credentials.createSsl(ca);
  const options = { 'grpc.enable_http_proxy': 0 }; // only the address given
  const auth = new kiln.auth.v1.AuthService(endpoint, credentials, options);
  const builds = new kiln.build.v1.BuildService(endpoint, credentials, options);
  const bearer = new grpc.Metadata();

  const unary = (client, method, request, metadata = bearer) =>
    new Promise((resolve, reject) =>
      client[method](request, metadata, { deadline: deadline() }, (err, response) =>
        err ? reject(err) : resolve(response),
      ),
    );

  function printEvent(ev) {
    switch (ev.event) {
      case 'output': {
        const stream = ev.output.stream === 'OUTPUT_STREAM_STDOUT' ? 'stdout' : 'stderr';
        for (const line of ev.output.data.toString('utf8').split('\n').filter((l) => l !== '')) {
          console.log(`  [${ev.sequence}] ${stream} | ${line}`);
        }
        break;
      }
      case 'step_started':
        console.log(`  [${ev.sequence}] step ${ev.step_started.step_index} started: ${ev.step_started.argv.join(' ')}`);
        break;
      case 'step_finished': {
        const f = ev.step_finished;
        const code = f.exit_code ?? '-';
        console.log(`  [${ev.sequence}] step ${f.step_index} finished: exit code ${code}, succeeded=${f.succeeded}`);
        break;
      }
      case 'finished':
        console.log(`  [${ev.sequence}] build finished: ${ev.finished.state}`);
        break;
      default:
        console.log(`  [${ev.sequence}] ${ev.event}`);
    }
  }

  /** WatchBuild: collects (and prints) the stored events; stops early after `stopAfter`. */
  function watch(request, { stopAfter = 0, quiet = false } = {}) {
    return new Promise((resolve, reject) => {
      const events = [];
      let stopped = false;
      const call = builds.WatchBuild(request, bearer, { deadline: deadline() });
      call.on('data', (ev) => {
        if (stopped) return;
        if (!quiet) printEvent(ev);
        if (ev.event !== 'heartbeat') events.push(ev);
        if (stopAfter && (events.length === stopAfter || ev.event === 'finished')) {
          stopped = true;
          call.cancel(); // the client goes away; the build goes on
          resolve(events);
        }
      });
      call.on('error', (err) => {
        if (!(stopped && err.code === grpc.status.CANCELLED)) reject(err);
      });
      call.on('end', () => {
        if (!stopped) resolve(events);
      });
    });
  }

  async function expectBadRequest(what, call, expected) {
    let err = null;
    try {
      await call();
    } catch (e) {
      err = e;
    }
    check(err, `${what}: succeeded, expected ${expected.code}`);
    const { code, message, info, violations } = richError(err);
    console.log(`${what}: ${code}: ${message}`);
    for (const v of violations) console.log(`  field violation: ${v.field}: ${v.description}`);
    check(info, `${what}: no google.rpc.ErrorInfo in the details`);
    const metadata = Object.keys(info.metadata).sort().map((k) => ` ${k}=${info.metadata[k]}`).join('');
    console.log(`  error info: reason=${info.reason} domain=${info.domain}${metadata}`);
    check(code === expected.code, `${what}: code ${code}, expected ${expected.code}`);
    check(info.reason === expected.reason, `${what}: reason ${info.reason}, expected ${expected.reason}`);
    check(info.domain === 'kiln.dev', `${what}: domain ${info.domain}, expected kiln.dev`);
    check(
      violations.some((v) => v.field === expected.field),
      `${what}: no field violation on ${expected.field} (got ${violations.map((v) => v.field)})`,
    );
  }

  try {
    // 1. Login; the access token goes in `authorization: Bearer …` on every later call.
    const login = await unary(auth, 'Login', { username, password }, new grpc.Metadata());
    bearer.set('authorization', `Bearer ${login.access_token}`);
    const who = (await unary(auth, 'WhoAmI', {})).principal;
    console.log(`logged in as ${who.username} (role ${who.role})`);
    check(who.username === username, `WhoAmI says ${who.username}, expected ${username}`);

    // 2. A workspace with one file.
    const workspace = await unary(builds, 'CreateWorkspace', {
      request_id: crypto.randomUUID(),
      files: [{ path: 'hello.py', content: Buffer.from(HELLO_PY) }],
      labels: { example: 'node-client' },
    });
    console.log(`created workspace ${workspace.id} (${workspace.file_count} file, ${workspace.size_bytes} bytes)`);

    // 3. Start a build and watch it live; drop the stream after a few events.
    const build = await unary(builds, 'StartBuild', {
      request_id: crypto.randomUUID(),
      workspace_id: workspace.id,
      steps: [{ argv: ['python3', 'hello.py'] }],
    });
    console.log(`started build ${build.id} (${build.state})`);
    console.log(`watching build ${build.id}:`);
    const first = await watch({ build_id: build.id }, { stopAfter: EVENTS_BEFORE_DISCONNECT });
    check(first.length === EVENTS_BEFORE_DISCONNECT, `the build ended after only ${first.length} events`);
    check(first[first.length - 1].event !== 'finished', 'the first watch saw the whole build');
    const lastSeen = first[first.length - 1].sequence;
    console.log(`disconnected after sequence ${lastSeen}`);

    // 4. Resume after the last sequence seen, to the end of the build.
    console.log(`resuming after sequence ${lastSeen}:`);
    const rest = await watch({ build_id: build.id, after_sequence: lastSeen });
    check(rest.length > 0, 'the resumed watch returned no event');
    const sequences = rest.map((e) => e.sequence);
    const expected = rest.map((_, i) => lastSeen + 1 + i);
    check(
      JSON.stringify(sequences) === JSON.stringify(expected),
      `resumed sequences ${sequences}, expected ${expected} (gap or duplicate)`,
    );
    check(rest[rest.length - 1].event === 'finished', 'the resumed watch did not end with Finished');

    // The first watch plus the resumed one must be exactly the build's log.
    const replay = await watch({ build_id: build.id }, { quiet: true });
    const seen = first.concat(rest);
    check(
      replay.every((e, i) => e.sequence === i + 1),
      `the full replay is not dense: ${replay.map((e) => e.sequence)}`,
    );
    check(
      JSON.stringify(seen) === JSON.stringify(replay),
      `watch + resume (${seen.length} events) differ from the full replay (${replay.length} events)`,
    );
    console.log(
      `resume ok: ${rest.length} events after sequence ${lastSeen}, ${seen.length} in all, ` +
        'no gap, no duplicate, identical to a full replay',
    );

    const finished = rest[rest.length - 1].finished;
    check(finished.state === 'BUILD_STATE_SUCCEEDED', `the build ended ${finished.state}: ${finished.message}`);
    const stdout = Buffer.concat(
      seen.filter((e) => e.event === 'output' && e.output.stream === 'OUTPUT_STREAM_STDOUT').map((e) => e.output.data),
    ).toString('utf8');
    check(stdout === 'hello from kiln\ngoodbye from kiln\n', `unexpected stdout ${JSON.stringify(stdout)}`);
    console.log('build succeeded');

    // 5. Bad requests and their rich error details.
    await expectBadRequest(
      'CreateWorkspace with path /etc/passwd',
      () => unary(builds, 'CreateWorkspace', { files: [{ path: '/etc/passwd', content: Buffer.from('x') }] }),
      { code: 'INVALID_ARGUMENT', reason: 'INVALID_PATH', field: 'files[0].path' },
    );
    await expectBadRequest(
      'StartBuild with an empty argv',
      () => unary(builds, 'StartBuild', { workspace_id: workspace.id, steps: [{ argv: [] }] }),
      { code: 'INVALID_ARGUMENT', reason: 'INVALID_ARGUMENT', field: 'steps[0].argv' },
    );
    // A call without a token: UNAUTHENTICATED with an ErrorInfo (and no BadRequest).
    let unauthenticated = null;
    try {
      await unary(builds, 'GetPolicy', {}, new grpc.Metadata());
    } catch (e) {
      unauthenticated = e;
    }
    check(unauthenticated, 'GetPolicy without a token succeeded');
    const { code, message, info } = richError(unauthenticated);
    check(info, 'no ErrorInfo on the unauthenticated call');
    console.log(`GetPolicy without a token: ${code}: ${message}`);
    console.log(`  error info: reason=${info.reason} domain=${info.domain}`);
    check(code === 'UNAUTHENTICATED', `code ${code}, expected UNAUTHENTICATED`);
  } finally {
    auth.close();
    builds.close();
  }
}

main().then(
  () => {
    console.log('node client: all checks passed');
  },
  (e) => {
    if (e instanceof CheckFailed) {
      console.error(`FAIL: ${e.message}`);
    } else if (e && typeof e.code === 'number' && e.details !== undefined) {
      console.error(`FAIL: ${e.message}`); // a gRPC error where none was expected: "14 UNAVAILABLE: …"
    } else {
      console.error(`FAIL: ${e && e.stack ? e.stack : e}`);
    }
    process.exitCode = 1;
  },
);
