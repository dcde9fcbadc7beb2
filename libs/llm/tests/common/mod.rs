//! A scripted fake LLM provider served over real HTTP/1.1 on 127.0.0.1, so tests drive
//! the real client code (reqwest, timeouts, retries, SSE/NDJSON parsing). Each path has a
//! queue of scripted replies, served in order; every request is recorded with the moment
//! it arrived. Reusable by any crate's tests that need a model server.
#![allow(dead_code)] // each test binary uses a different part of it

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_llm::{ProviderConfig, ProviderKind, RetryConfig, TimeoutConfig};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// One piece of a scripted reply body.
#[derive(Debug, Clone)]
pub enum Part {
    /// Written as one HTTP chunk and flushed.
    Bytes(Vec<u8>),
    /// The server says nothing for a while (a slow model).
    Pause(Duration),
    /// The server says nothing until the client closes the connection, and records it.
    Hang,
    /// The server closes the connection here, mid-body.
    Cut,
}

/// A scripted reply.
#[derive(Debug, Clone)]
pub struct Reply {
    /// `None`: no response at all (see [`Reply::silent`], [`Reply::drop_connection`]).
    status: Option<u16>,
    headers: Vec<(String, String)>,
    parts: Vec<Part>,
}

impl Reply {
    pub fn status(status: u16) -> Self {
        Self {
            status: Some(status),
            headers: Vec::new(),
            parts: Vec::new(),
        }
    }

    pub fn json(status: u16, body: &Value) -> Self {
        Self::status(status)
            .header("content-type", "application/json")
            .bytes(body.to_string())
    }

    /// Reads the request, then closes the connection without a response.
    pub fn drop_connection() -> Self {
        Self {
            status: None,
            headers: Vec::new(),
            parts: vec![Part::Cut],
        }
    }

    /// Reads the request, then never answers (until the client gives up).
    pub fn silent() -> Self {
        Self {
            status: None,
            headers: Vec::new(),
            parts: vec![Part::Hang],
        }
    }

    /// `200 text/event-stream` with these raw SSE lines (each gets its `\n`).
    pub fn sse_lines(lines: &[&str]) -> Self {
        let mut reply = Self::status(200).header("content-type", "text/event-stream");
        for line in lines {
            reply = reply.bytes(format!("{line}\n"));
        }
        reply
    }

    /// An OpenAI-style stream: a role chunk, one chunk per text, the finish reason, a
    /// usage chunk (when given) and `[DONE]`, each event its own HTTP chunk.
    pub fn openai_stream(texts: &[&str], finish: &str, usage: Option<(u64, u64)>) -> Self {
        let mut reply = Self::status(200).header("content-type", "text/event-stream");
        reply = reply.sse(&openai_chunk(
            json!({"role": "assistant", "content": ""}),
            None,
        ));
        for text in texts {
            reply = reply.sse(&openai_chunk(json!({"content": text}), None));
        }
        reply = reply.sse(&openai_chunk(json!({}), Some(finish)));
        if let Some((prompt, completion)) = usage {
            reply = reply.sse(&json!({
                "object": "chat.completion.chunk",
                "choices": [],
                "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                          "total_tokens": prompt + completion},
            }));
        }
        reply.bytes("data: [DONE]\n\n")
    }

    /// An Ollama stream: one line per text, then the `done` line with the counts.
    pub fn ollama_stream(texts: &[&str], done_reason: &str, counts: (u64, u64)) -> Self {
        let mut reply = Self::status(200).header("content-type", "application/x-ndjson");
        for text in texts {
            reply = reply.ndjson(&ollama_line(text));
        }
        reply.ndjson(&json!({
            "model": "qwen", "created_at": "2026-12-01T00:00:00Z",
            "message": {"role": "assistant", "content": ""},
            "done": true, "done_reason": done_reason,
            "prompt_eval_count": counts.0, "eval_count": counts.1,
        }))
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    pub fn bytes(self, bytes: impl Into<Vec<u8>>) -> Self {
        self.then(Part::Bytes(bytes.into()))
    }

    /// One SSE `data:` event.
    pub fn sse(self, data: &Value) -> Self {
        self.bytes(format!("data: {data}\n\n"))
    }

    /// One NDJSON line.
    pub fn ndjson(self, line: &Value) -> Self {
        self.bytes(format!("{line}\n"))
    }

    pub fn then(mut self, part: Part) -> Self {
        self.parts.push(part);
        self
    }

    /// This reply without its last `n` parts (to truncate a scripted stream).
    pub fn without_last(mut self, n: usize) -> Self {
        let keep = self.parts.len().saturating_sub(n);
        self.parts.truncate(keep);
        self
    }
}

pub fn openai_chunk(delta: Value, finish: Option<&str>) -> Value {
    json!({
        "id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "qwen",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    })
}

pub fn ollama_line(text: &str) -> Value {
    json!({
        "model": "qwen", "created_at": "2026-12-01T00:00:00Z",
        "message": {"role": "assistant", "content": text}, "done": false,
    })
}

/// A request as the fake server saw it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    /// Names in lower case.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// When the whole request had arrived.
    pub at: Instant,
}

impl Recorded {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("the request body is JSON")
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Default)]
struct Shared {
    scripts: Mutex<HashMap<String, VecDeque<Reply>>>,
    /// Served when a path's queue is empty (e.g. a model list asked for again and again).
    defaults: Mutex<HashMap<String, Reply>>,
    requests: Mutex<Vec<Recorded>>,
}

/// The fake server. Stops when dropped.
pub struct FakeProvider {
    addr: SocketAddr,
    shared: Arc<Shared>,
    /// How many hanging replies ended because the client closed the connection.
    closed: watch::Receiver<usize>,
    task: JoinHandle<()>,
}

impl Drop for FakeProvider {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeProvider {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared::default());
        let (closed_tx, closed) = watch::channel(0);
        let closed_tx = Arc::new(closed_tx);
        let task = tokio::spawn({
            let shared = shared.clone();
            async move {
                // Connection tasks are detached: they end with their connection.
                while let Ok((socket, _)) = listener.accept().await {
                    tokio::spawn(serve(socket, shared.clone(), closed_tx.clone()));
                }
            }
        });
        Self {
            addr,
            shared,
            closed,
            task,
        }
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Queues `reply` for the next request to `path`. Unscripted requests get a 404.
    pub fn push(&self, path: &str, reply: Reply) {
        self.shared
            .scripts
            .lock()
            .unwrap()
            .entry(path.to_owned())
            .or_default()
            .push_back(reply);
    }

    /// Serves `reply` for every request to `path` that finds its queue empty.
    pub fn always(&self, path: &str, reply: Reply) {
        self.shared
            .defaults
            .lock()
            .unwrap()
            .insert(path.to_owned(), reply);
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.requests.lock().unwrap().clone()
    }

    /// Waits until `n` hanging replies have seen their client close the connection.
    pub async fn wait_for_closed_connections(&self, n: usize) {
        let mut closed = self.closed.clone();
        let wait = closed.wait_for(|&count| count >= n);
        tokio::time::timeout(Duration::from_secs(10), wait)
            .await
            .expect("the client never closed the connection")
            .unwrap();
    }
}

/// Short timeouts and backoffs so every failure mode resolves in well under a second,
/// except where a test says otherwise.
pub fn fast_config(kind: ProviderKind, url: &str) -> ProviderConfig {
    ProviderConfig {
        kind,
        base_url: Some(url.to_owned()),
        api_key_env: None,
        timeouts: TimeoutConfig {
            connect: Duration::from_secs(2),
            request: Duration::from_secs(20),
            idle: Duration::from_secs(5),
        },
        retry: RetryConfig {
            max_attempts: 3,
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(50),
            max_retry_after: Duration::from_secs(5),
        },
    }
}

async fn serve(mut socket: TcpStream, shared: Arc<Shared>, closed: Arc<watch::Sender<usize>>) {
    let mut buffer = Vec::new();
    loop {
        let Some(request) = read_request(&mut socket, &mut buffer).await else {
            return;
        };
        let reply = shared
            .scripts
            .lock()
            .unwrap()
            .get_mut(&request.path)
            .and_then(VecDeque::pop_front)
            .or_else(|| shared.defaults.lock().unwrap().get(&request.path).cloned())
            .unwrap_or_else(|| {
                Reply::json(
                    404,
                    &json!({"error": format!("no script for {}", request.path)}),
                )
            });
        shared.requests.lock().unwrap().push(request);
        if !write_reply(&mut socket, reply, &closed).await {
            return;
        }
    }
}

/// Reads one request (head and `Content-Length` body); `None` when the client closed.
async fn read_request(socket: &mut TcpStream, buffer: &mut Vec<u8>) -> Option<Recorded> {
    let head_end = loop {
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break end;
        }
        let mut chunk = [0u8; 8192];
        match socket.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buffer[..head_end]).into_owned();
    buffer.drain(..head_end + 4);
    let mut lines = head.split("\r\n");
    let mut request_line = lines.next()?.split(' ');
    let method = request_line.next()?.to_owned();
    let path = request_line.next()?.to_owned();
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let length: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    while buffer.len() < length {
        let mut chunk = [0u8; 8192];
        match socket.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
        }
    }
    let body = buffer.drain(..length).collect();
    Some(Recorded {
        method,
        path,
        headers,
        body,
        at: Instant::now(),
    })
}

/// Writes `reply` with chunked encoding; `false` when the connection is to end.
async fn write_reply(socket: &mut TcpStream, reply: Reply, closed: &watch::Sender<usize>) -> bool {
    if let Some(status) = reply.status {
        let mut head = format!("HTTP/1.1 {status} Scripted\r\ntransfer-encoding: chunked\r\n");
        for (name, value) in &reply.headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        if socket.write_all(head.as_bytes()).await.is_err() {
            return false;
        }
    }
    for part in reply.parts {
        match part {
            Part::Bytes(bytes) => {
                let mut chunk = format!("{:x}\r\n", bytes.len()).into_bytes();
                chunk.extend_from_slice(&bytes);
                chunk.extend_from_slice(b"\r\n");
                if socket.write_all(&chunk).await.is_err() || socket.flush().await.is_err() {
                    return false;
                }
            }
            Part::Pause(duration) => tokio::time::sleep(duration).await,
            Part::Hang => {
                // HTTP/1.1 clients send nothing more while awaiting a response, so a
                // read that returns means the client closed (or reset) the connection.
                let mut byte = [0u8; 1];
                let _ = socket.read(&mut byte).await;
                closed.send_modify(|count| *count += 1);
                return false;
            }
            Part::Cut => return false,
        }
    }
    socket.write_all(b"0\r\n\r\n").await.is_ok()
}
