#!/usr/bin/env python3
"""A kiln client in Python (grpcio): log in, build, stream, resume, decode rich errors.

The stubs are generated from the repository's proto/ at start-up by grpcio-tools into a
temporary directory (nothing generated is committed). Then, over TLS with the CA file:

  1. Login as a user (AuthService/Login) and use the access token as a bearer token;
  2. CreateWorkspace with a small hello.py;
  3. StartBuild `python3 hello.py` and WatchBuild it, printing its output live, then
     drop the stream mid-way (a client that disconnects);
  4. resume with WatchBuild(after_sequence = last sequence seen) and check that exactly
     the remaining events arrive: no gap, no duplicate, identical to a full replay;
  5. send two bad requests (a file path `/etc/passwd`, a step with an empty argv) and
     decode the `grpc-status-details-bin` trailer: google.rpc.Status with
     google.rpc.BadRequest field violations and google.rpc.ErrorInfo.

Configuration (environment):
  KILN_ENDPOINT   host:port (an https:// prefix is accepted), default 127.0.0.1:7443
  KILN_CA         the CA certificate file (PEM), e.g. <data-dir>/pki/ca.pem
  KILN_USERNAME   a user with role user (or higher)
  KILN_PASSWORD   its password
  KILN_PROTO_DIR  the proto/ directory, default: the repository's, found from this file

Dependencies: examples/clients/python/requirements.txt (`make tools` installs them into
.tools/python; run with PYTHONPATH=.tools/python). Exits 0 when every check passed, 1
with a `FAIL:` line otherwise.
"""

import os
import shutil
import sys
import tempfile
import uuid

HELLO_PY = b"""import sys
print("hello from kiln", flush=True)
print("a line on stderr", file=sys.stderr, flush=True)
print("goodbye from kiln", flush=True)
"""

# Events of the first watch before it drops the stream: Queued, Started, StepStarted.
EVENTS_BEFORE_DISCONNECT = 3


class CheckFailed(Exception):
    pass


def check(condition, message):
    if not condition:
        raise CheckFailed(message)


def need(name):
    value = os.environ.get(name)
    if not value:
        raise CheckFailed(f"{name} is not set (see the top of {os.path.basename(__file__)})")
    return value


def import_deps():
    """Imports grpcio and friends, with a hint instead of a traceback when missing."""
    try:
        import grpc  # noqa: F401
        import grpc_tools  # noqa: F401
        from google.rpc import error_details_pb2  # noqa: F401
        from grpc_status import rpc_status  # noqa: F401
    except ImportError as e:
        raise CheckFailed(
            f"{e}: the Python dependencies are missing; run `make tools` "
            "(it installs examples/clients/python/requirements.txt into .tools/python) "
            "and run with PYTHONPATH=.tools/python"
        ) from e


def generate_stubs(proto_dir, out_dir):
    """Runs grpcio-tools' protoc over proto/ into out_dir and puts it on sys.path."""
    import grpc_tools
    from grpc_tools import protoc

    # grpc_tools ships google/protobuf/*.proto (timestamp, duration, descriptor, …).
    well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    protos = sorted(
        os.path.relpath(os.path.join(root, name), proto_dir)
        for root, _, names in os.walk(proto_dir)
        for name in names
        if name.endswith(".proto")
    )
    check(protos, f"no .proto files under {proto_dir}")
    args = [
        "grpc_tools.protoc",
        f"-I{proto_dir}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *protos,
    ]
    check(protoc.main(args) == 0, f"protoc failed on {proto_dir}")
    sys.path.insert(0, out_dir)


def rich_error(err):
    """Decodes a failed call's grpc-status-details-bin trailer.

    Returns (code name, message, ErrorInfo or None, [BadRequest.FieldViolation]).
    """
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    status = rpc_status.from_call(err)  # google.rpc.Status from the trailer
    check(status is not None, f"{err.code().name} without grpc-status-details-bin: {err.details()}")
    info, violations = None, []
    for detail in status.details:  # each a google.protobuf.Any
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations.extend(bad.field_violations)
    return err.code().name, status.message, info, violations


def expect_bad_request(what, call, code, reason, field):
    """Makes a call that must fail, prints its decoded details and checks them."""
    import grpc

    try:
        call()
    except grpc.RpcError as err:
        got_code, message, info, violations = rich_error(err)
    else:
        raise CheckFailed(f"{what}: succeeded, expected {code}")
    print(f"{what}: {got_code}: {message}")
    for v in violations:
        print(f"  field violation: {v.field}: {v.description}")
    check(info is not None, f"{what}: no google.rpc.ErrorInfo in the details")
    metadata = "".join(f" {k}={v}" for k, v in sorted(info.metadata.items()))
    print(f"  error info: reason={info.reason} domain={info.domain}{metadata}")
    check(got_code == code, f"{what}: code {got_code}, expected {code}")
    check(info.reason == reason, f"{what}: reason {info.reason}, expected {reason}")
    check(info.domain == "kiln.dev", f"{what}: domain {info.domain}, expected kiln.dev")
    check(
        any(v.field == field for v in violations),
        f"{what}: no field violation on {field} (got {[v.field for v in violations]})",
    )


def print_event(ev, build_pb2):
    kind = ev.WhichOneof("event")
    if kind == "output":
        stream = "stdout" if ev.output.stream == build_pb2.OUTPUT_STREAM_STDOUT else "stderr"
        for line in ev.output.data.decode("utf-8", "replace").splitlines():
            print(f"  [{ev.sequence}] {stream} | {line}")
    elif kind == "step_started":
        print(f"  [{ev.sequence}] step {ev.step_started.step_index} started: {' '.join(ev.step_started.argv)}")
    elif kind == "step_finished":
        f = ev.step_finished
        code = f.exit_code if f.HasField("exit_code") else "-"
        print(f"  [{ev.sequence}] step {f.step_index} finished: exit code {code}, succeeded={f.succeeded}")
    elif kind == "finished":
        print(f"  [{ev.sequence}] build finished: {build_pb2.BuildState.Name(ev.finished.state)}")
    else:
        print(f"  [{ev.sequence}] {kind}")


def stored(events):
    """Drops heartbeats: they are not stored and repeat the last sequence."""
    return [e for e in events if e.WhichOneof("event") != "heartbeat"]


def run():
    import_deps()
    import grpc

    endpoint = os.environ.get("KILN_ENDPOINT", "127.0.0.1:7443").removeprefix("https://")
    ca_file, username, password = need("KILN_CA"), need("KILN_USERNAME"), need("KILN_PASSWORD")
    here = os.path.dirname(os.path.abspath(__file__))
    proto_dir = os.environ.get("KILN_PROTO_DIR") or os.path.join(here, "..", "..", "..", "proto")

    stubs = tempfile.mkdtemp(prefix="kiln-python-stubs-")
    try:
        generate_stubs(os.path.abspath(proto_dir), stubs)
        from kiln.auth.v1 import auth_pb2, auth_pb2_grpc
        from kiln.build.v1 import build_pb2, build_pb2_grpc

        with open(ca_file, "rb") as f:
            credentials = grpc.ssl_channel_credentials(root_certificates=f.read())
        # Only the address given, never a proxy from the environment.
        options = [("grpc.enable_http_proxy", 0)]
        with grpc.secure_channel(endpoint, credentials, options=options) as channel:
            flow(channel, auth_pb2, auth_pb2_grpc, build_pb2, build_pb2_grpc, username, password)
    finally:
        shutil.rmtree(stubs, ignore_errors=True)


def flow(channel, auth_pb2, auth_pb2_grpc, build_pb2, build_pb2_grpc, username, password):
    import grpc

    timeout = 30  # seconds, per call
    auth = auth_pb2_grpc.AuthServiceStub(channel)
    builds = build_pb2_grpc.BuildServiceStub(channel)

    # 1. Login; the access token goes in `authorization: Bearer …` on every later call.
    login = auth.Login(auth_pb2.LoginRequest(username=username, password=password), timeout=timeout)
    bearer = [("authorization", f"Bearer {login.access_token}")]
    who = auth.WhoAmI(auth_pb2.WhoAmIRequest(), metadata=bearer, timeout=timeout).principal
    print(f"logged in as {who.username} (role {auth_pb2.Role.Name(who.role)})")
    check(who.username == username, f"WhoAmI says {who.username}, expected {username}")

    # 2. A workspace with one file.
    workspace = builds.CreateWorkspace(
        build_pb2.CreateWorkspaceRequest(
            request_id=str(uuid.uuid4()),
            files=[build_pb2.File(path="hello.py", content=HELLO_PY)],
            labels={"example": "python-client"},
        ),
        metadata=bearer,
        timeout=timeout,
    )
    print(f"created workspace {workspace.id} ({workspace.file_count} file, {workspace.size_bytes} bytes)")

    # 3. Start a build and watch it live; drop the stream after a few events.
    build = builds.StartBuild(
        build_pb2.StartBuildRequest(
            request_id=str(uuid.uuid4()),
            workspace_id=workspace.id,
            steps=[build_pb2.Step(argv=["python3", "hello.py"])],
        ),
        metadata=bearer,
        timeout=timeout,
    )
    print(f"started build {build.id} ({build_pb2.BuildState.Name(build.state)})")
    print(f"watching build {build.id}:")
    first = []
    watch = builds.WatchBuild(build_pb2.WatchBuildRequest(build_id=build.id), metadata=bearer, timeout=timeout)
    for ev in watch:
        print_event(ev, build_pb2)
        if ev.WhichOneof("event") != "heartbeat":
            first.append(ev)
        if len(first) == EVENTS_BEFORE_DISCONNECT or ev.WhichOneof("event") == "finished":
            break
    watch.cancel()  # the client goes away; the build goes on
    check(len(first) == EVENTS_BEFORE_DISCONNECT, f"the build ended after only {len(first)} events")
    check(first[-1].WhichOneof("event") != "finished", "the first watch saw the whole build")
    last_seen = first[-1].sequence
    print(f"disconnected after sequence {last_seen}")

    # 4. Resume after the last sequence seen, to the end of the build.
    print(f"resuming after sequence {last_seen}:")
    rest = []
    for ev in builds.WatchBuild(
        build_pb2.WatchBuildRequest(build_id=build.id, after_sequence=last_seen),
        metadata=bearer,
        timeout=timeout,
    ):
        print_event(ev, build_pb2)
        rest.append(ev)
    rest = stored(rest)
    check(rest, "the resumed watch returned no event")
    sequences = [e.sequence for e in rest]
    expected = list(range(last_seen + 1, last_seen + 1 + len(rest)))
    check(sequences == expected, f"resumed sequences {sequences}, expected {expected} (gap or duplicate)")
    check(rest[-1].WhichOneof("event") == "finished", "the resumed watch did not end with Finished")

    # The first watch plus the resumed one must be exactly the build's log.
    replay = stored(
        builds.WatchBuild(build_pb2.WatchBuildRequest(build_id=build.id), metadata=bearer, timeout=timeout)
    )
    seen = first + rest
    check(
        [e.sequence for e in replay] == list(range(1, len(replay) + 1)),
        f"the full replay is not dense: {[e.sequence for e in replay]}",
    )
    check(
        [e.SerializeToString(deterministic=True) for e in seen]
        == [e.SerializeToString(deterministic=True) for e in replay],
        f"watch + resume ({len(seen)} events) differ from the full replay ({len(replay)} events)",
    )
    print(
        f"resume ok: {len(rest)} events after sequence {last_seen}, "
        f"{len(seen)} in all, no gap, no duplicate, identical to a full replay"
    )

    finished = rest[-1].finished
    check(
        finished.state == build_pb2.BUILD_STATE_SUCCEEDED,
        f"the build ended {build_pb2.BuildState.Name(finished.state)}: {finished.message}",
    )
    stdout = b"".join(
        e.output.data
        for e in seen
        if e.WhichOneof("event") == "output" and e.output.stream == build_pb2.OUTPUT_STREAM_STDOUT
    )
    check(stdout == b"hello from kiln\ngoodbye from kiln\n", f"unexpected stdout {stdout!r}")
    print("build succeeded")

    # 5. Bad requests and their rich error details.
    expect_bad_request(
        "CreateWorkspace with path /etc/passwd",
        lambda: builds.CreateWorkspace(
            build_pb2.CreateWorkspaceRequest(files=[build_pb2.File(path="/etc/passwd", content=b"x")]),
            metadata=bearer,
            timeout=timeout,
        ),
        code="INVALID_ARGUMENT",
        reason="INVALID_PATH",
        field="files[0].path",
    )
    expect_bad_request(
        "StartBuild with an empty argv",
        lambda: builds.StartBuild(
            build_pb2.StartBuildRequest(workspace_id=workspace.id, steps=[build_pb2.Step(argv=[])]),
            metadata=bearer,
            timeout=timeout,
        ),
        code="INVALID_ARGUMENT",
        reason="INVALID_ARGUMENT",
        field="steps[0].argv",
    )
    # A call without a token: UNAUTHENTICATED with an ErrorInfo (and no BadRequest).
    try:
        builds.GetPolicy(build_pb2.GetPolicyRequest(), timeout=timeout)
        raise CheckFailed("GetPolicy without a token succeeded")
    except grpc.RpcError as err:
        code, message, info, _ = rich_error(err)
        check(info is not None, "no ErrorInfo on the unauthenticated call")
        print(f"GetPolicy without a token: {code}: {message}")
        print(f"  error info: reason={info.reason} domain={info.domain}")
        check(code == "UNAUTHENTICATED", f"code {code}, expected UNAUTHENTICATED")


def main():
    try:
        run()
    except CheckFailed as e:
        print(f"FAIL: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # a gRPC error where none was expected, a missing file, …
        code = getattr(e, "code", None)
        if callable(code):
            print(f"FAIL: {code().name}: {e.details()}", file=sys.stderr)
        else:
            print(f"FAIL: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print("python client: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
