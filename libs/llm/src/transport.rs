//! The HTTP side both dialects share: the client, timeouts, retries, bounded reads and
//! line splitting. The dialect modules only build request bodies and decode lines.

use std::error::Error as _;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures::StreamExt as _;
use futures::stream::BoxStream;
use reqwest::header::{CONTENT_TYPE, RETRY_AFTER};
use reqwest::{Method, Response, StatusCode, Url};
use tokio::time::Instant;

use crate::config::{RetryConfig, TimeoutConfig};
use crate::error::{LlmError, UNREACHABLE_HINT};
use crate::retry::{backoff, parse_retry_after};

/// The longest line kiln accepts from a stream. One SSE event carries a few tokens; a
/// line this long is a broken or hostile server, and must not grow memory unbounded.
const MAX_LINE_BYTES: usize = 1 << 20;
/// The most of a non-streamed body (a model list) kiln reads.
const MAX_BODY_BYTES: usize = 8 << 20;
/// How much of an error body goes into [`LlmError::Http`].
const ERROR_EXCERPT_BYTES: usize = 2048;

/// One request to send, possibly more than once.
#[derive(Debug, Clone)]
pub(crate) struct RequestSpec {
    pub method: Method,
    pub path: &'static str,
    /// Serialized JSON, sent with `Content-Type: application/json`.
    pub body: Option<Bytes>,
}

/// The time limits of one call: the overall deadline and the idle allowance.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Deadline {
    at: Instant,
    total: Duration,
    idle: Duration,
}

impl Deadline {
    pub fn start(timeouts: &TimeoutConfig) -> Self {
        Self {
            at: Instant::now() + timeouts.request,
            total: timeouts.request,
            idle: timeouts.idle,
        }
    }

    /// Runs `fut` until it finishes, the provider has been idle too long, or the call's
    /// deadline passes, whichever is first.
    pub async fn within<F: Future>(
        &self,
        during: &'static str,
        fut: F,
    ) -> Result<F::Output, LlmError> {
        let idle_at = Instant::now() + self.idle;
        let (limit, error) = if idle_at < self.at {
            (
                idle_at,
                LlmError::Timeout {
                    after: self.idle,
                    during,
                },
            )
        } else {
            (
                self.at,
                LlmError::Timeout {
                    after: self.total,
                    during: "the whole call",
                },
            )
        };
        tokio::time::timeout_at(limit, fut).await.map_err(|_| error)
    }

    /// Whether a wait of `wait` still leaves time before the deadline.
    pub fn allows(&self, wait: Duration) -> bool {
        Instant::now() + wait < self.at
    }
}

/// A client bound to one provider's base URL.
pub(crate) struct Transport {
    client: reqwest::Client,
    base_url: String,
    api_key: Option<String>,
    pub timeouts: TimeoutConfig,
    pub retry: RetryConfig,
}

impl fmt::Debug for Transport {
    // Never print the API key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Transport")
            .field("base_url", &self.base_url)
            .field("api_key", &self.api_key.as_ref().map(|_| "…"))
            .field("timeouts", &self.timeouts)
            .field("retry", &self.retry)
            .finish()
    }
}

/// What one attempt ended with, when it did not succeed.
enum Failure {
    /// Worth another attempt; `retry_after` is what the provider asked for.
    Retryable {
        error: LlmError,
        retry_after: Option<Duration>,
    },
    Final(LlmError),
}

impl Transport {
    pub fn new(
        base_url: &str,
        api_key: Option<String>,
        timeouts: TimeoutConfig,
        retry: RetryConfig,
    ) -> Result<Arc<Self>, LlmError> {
        let url = Url::parse(base_url)
            .map_err(|e| LlmError::Config(format!("base URL {base_url:?}: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(LlmError::Config(format!(
                "base URL {base_url:?} must be http:// or https:// with a host"
            )));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(LlmError::Config(format!(
                "base URL {base_url:?} must not carry a query or fragment"
            )));
        }
        if retry.max_attempts == 0 {
            return Err(LlmError::Config(
                "retry.max_attempts must be at least 1".into(),
            ));
        }
        if let Some(key) = &api_key
            && reqwest::header::HeaderValue::from_str(&format!("Bearer {key}")).is_err()
        {
            // Found now rather than as a confusing send error on every call.
            return Err(LlmError::Config(
                "the API key has characters an HTTP header cannot carry".into(),
            ));
        }
        let tls = tls_config()?;
        let mut builder = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .connect_timeout(timeouts.connect)
            // A model API never redirects; following one could carry the key elsewhere
            // or downgrade https to http. A 3xx is reported as an HTTP error instead.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("kiln-llm/", env!("CARGO_PKG_VERSION")));
        if is_loopback(&url) {
            // A local model server is never reached through a proxy from the environment.
            builder = builder.no_proxy();
        }
        let client = builder
            .build()
            .map_err(|e| LlmError::Config(format!("HTTP client: {}", error_chain(&e))))?;
        Ok(Arc::new(Self {
            client,
            base_url: base_url.trim_end_matches('/').to_owned(),
            api_key,
            timeouts,
            retry,
        }))
    }

    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// `{base}{path}`, where an OpenAI-style base that already ends in `/v1` does not get
    /// a second one.
    pub fn url(&self, path: &str) -> String {
        match (self.base_url.strip_suffix("/v1"), path.strip_prefix("/v1/")) {
            (Some(base), Some(_)) => format!("{base}{path}"),
            _ => format!("{}{path}", self.base_url),
        }
    }

    /// Sends `spec`, retrying connection errors, 429 and 5xx within the retry settings
    /// and the deadline, and returns the first successful response. `attempts` counts
    /// across calls, so a caller that retries a broken body shares the same budget.
    pub async fn send(
        &self,
        spec: &RequestSpec,
        deadline: &Deadline,
        attempts: &mut u32,
    ) -> Result<Response, LlmError> {
        loop {
            *attempts += 1;
            let (error, retry_after) = match self.attempt(spec, deadline).await {
                Ok(response) => return Ok(response),
                Err(Failure::Final(error)) => return Err(error),
                Err(Failure::Retryable { error, retry_after }) => (error, retry_after),
            };
            let wait = self
                .wait_before_retry(*attempts, retry_after, deadline)
                .ok_or(error)?;
            tracing::warn!(
                url = %self.url(spec.path),
                attempt = *attempts,
                wait_ms = wait.as_millis() as u64,
                "LLM provider call failed; retrying"
            );
            tokio::time::sleep(wait).await;
        }
    }

    /// How long to wait before the attempt after `attempts`, or `None` when there is to be
    /// no further attempt (out of attempts, a `Retry-After` beyond the cap, or a wait that
    /// would pass the deadline).
    pub fn wait_before_retry(
        &self,
        attempts: u32,
        retry_after: Option<Duration>,
        deadline: &Deadline,
    ) -> Option<Duration> {
        if attempts >= self.retry.max_attempts {
            return None;
        }
        if retry_after.is_some_and(|wait| wait > self.retry.max_retry_after) {
            return None;
        }
        let wait = backoff(&self.retry, attempts).max(retry_after.unwrap_or_default());
        deadline.allows(wait).then_some(wait)
    }

    async fn attempt(&self, spec: &RequestSpec, deadline: &Deadline) -> Result<Response, Failure> {
        let url = self.url(spec.path);
        let mut request = self.client.request(spec.method.clone(), &url);
        if let Some(key) = &self.api_key {
            request = request.bearer_auth(key);
        }
        if let Some(body) = &spec.body {
            request = request
                .header(CONTENT_TYPE, "application/json")
                .body(body.clone());
        }
        let response = match deadline
            .within("waiting for the response", request.send())
            .await
        {
            Err(timeout) => return Err(Failure::Final(timeout)),
            Ok(Err(e)) if e.is_connect() => {
                return Err(Failure::Retryable {
                    error: LlmError::Unreachable {
                        url,
                        cause: error_chain(&e),
                        hint: UNREACHABLE_HINT,
                    },
                    retry_after: None,
                });
            }
            Ok(Err(e)) => {
                // Accepted, then closed or reset before a response: the server is
                // restarting or overloaded, which is worth another attempt.
                return Err(Failure::Retryable {
                    error: LlmError::Connection {
                        url,
                        detail: error_chain(&e),
                    },
                    retry_after: None,
                });
            }
            Ok(Ok(response)) => response,
        };
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, SystemTime::now()));
        let body_excerpt = read_excerpt(response, deadline).await;
        if status == StatusCode::TOO_MANY_REQUESTS {
            Err(Failure::Retryable {
                error: LlmError::RateLimited { retry_after },
                retry_after,
            })
        } else if status.is_server_error() {
            Err(Failure::Retryable {
                error: LlmError::Http {
                    status: status.as_u16(),
                    body_excerpt,
                },
                retry_after,
            })
        } else {
            Err(Failure::Final(LlmError::Http {
                status: status.as_u16(),
                body_excerpt,
            }))
        }
    }

    /// GETs `path` (with retries) and parses the JSON body.
    pub async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        path: &'static str,
    ) -> Result<T, LlmError> {
        let deadline = Deadline::start(&self.timeouts);
        let spec = RequestSpec {
            method: Method::GET,
            path,
            body: None,
        };
        let mut attempts = 0;
        let mut response = self.send(&spec, &deadline, &mut attempts).await?;
        let mut body = Vec::new();
        while let Some(chunk) = deadline
            .within("reading the response", response.chunk())
            .await?
            .map_err(|e| LlmError::Connection {
                url: self.url(path),
                detail: error_chain(&e),
            })?
        {
            if body.len() + chunk.len() > MAX_BODY_BYTES {
                return Err(LlmError::Protocol(format!(
                    "{path} answered more than {MAX_BODY_BYTES} bytes"
                )));
            }
            body.extend_from_slice(&chunk);
        }
        serde_json::from_slice(&body)
            .map_err(|e| LlmError::Protocol(format!("{path} answered malformed JSON: {e}")))
    }
}

/// The first bytes of an error body, as text, for the error message.
async fn read_excerpt(mut response: Response, deadline: &Deadline) -> String {
    let mut excerpt = Vec::new();
    while excerpt.len() < ERROR_EXCERPT_BYTES {
        match deadline
            .within("reading an error body", response.chunk())
            .await
        {
            Ok(Ok(Some(chunk))) => excerpt.extend_from_slice(&chunk),
            _ => break,
        }
    }
    excerpt.truncate(ERROR_EXCERPT_BYTES);
    String::from_utf8_lossy(&excerpt).trim().to_owned()
}

/// A reqwest error with its causes, which carry the useful part ("connection refused").
pub(crate) fn error_chain(error: &reqwest::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn is_loopback(url: &Url) -> bool {
    match url.host_str() {
        Some(host) if host.eq_ignore_ascii_case("localhost") => true,
        Some(host) => host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback()),
        None => false,
    }
}

/// rustls with kiln's provider (ring) and the platform's trust store, for providers
/// reached over https.
fn tls_config() -> Result<rustls::ClientConfig, LlmError> {
    use rustls_platform_verifier::BuilderVerifierExt as _;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|builder| builder.with_platform_verifier())
        .map_err(|e| LlmError::Config(format!("TLS: {e}")))?
        .with_no_client_auth();
    Ok(config)
}

/// Why reading the next line failed.
pub(crate) enum ReadError {
    /// The connection broke: retryable while nothing has been streamed.
    Broken(String),
    Fatal(LlmError),
}

/// Splits a response body into lines, with the idle timeout between chunks and a bound
/// on line length.
pub(crate) struct Lines {
    body: BoxStream<'static, reqwest::Result<Bytes>>,
    buffer: Vec<u8>,
    ended: bool,
}

impl Lines {
    pub fn new(response: Response) -> Self {
        Self {
            body: response.bytes_stream().boxed(),
            buffer: Vec::new(),
            ended: false,
        }
    }

    /// The next line without its `\n` (or `\r\n`), `None` at the end of the body.
    pub async fn next_line(&mut self, deadline: &Deadline) -> Result<Option<String>, ReadError> {
        loop {
            if let Some(newline) = self.buffer.iter().position(|&b| b == b'\n') {
                let mut line: Vec<u8> = self.buffer.drain(..=newline).collect();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return decode(line).map(Some);
            }
            if self.buffer.len() > MAX_LINE_BYTES {
                return Err(ReadError::Fatal(LlmError::Protocol(format!(
                    "a line longer than {MAX_LINE_BYTES} bytes"
                ))));
            }
            if self.ended {
                if self.buffer.is_empty() {
                    return Ok(None);
                }
                return decode(std::mem::take(&mut self.buffer)).map(Some);
            }
            match deadline
                .within("waiting for the next chunk", self.body.next())
                .await
            {
                Err(timeout) => return Err(ReadError::Fatal(timeout)),
                Ok(None) => self.ended = true,
                Ok(Some(Ok(chunk))) => self.buffer.extend_from_slice(&chunk),
                Ok(Some(Err(e))) => return Err(ReadError::Broken(error_chain(&e))),
            }
        }
    }
}

fn decode(line: Vec<u8>) -> Result<String, ReadError> {
    String::from_utf8(line)
        .map_err(|_| ReadError::Fatal(LlmError::Protocol("a line that is not UTF-8".into())))
}
