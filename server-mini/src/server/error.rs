//! OpenAI-style error responses.
//!
//! Every failure the server answers is one [`ApiError`]: an HTTP status and
//! the body clients already parse,
//!
//! ```text
//!   {"error": {"message": "...", "type": "invalid_request_error", "param": "max_tokens", "code": null}}
//! ```
//!
//! plus, for back-pressure (429/503), a `Retry-After` header.

use hyper::StatusCode;
use serde::Serialize;

/// The `type` field: which side is at fault, in OpenAI's words.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    InvalidRequestError,
    AuthenticationError,
    PermissionError,
    NotFoundError,
    RateLimitError,
    ServerError,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: ErrorKind,
    pub message: String,
    /// The request field at fault, when one is.
    pub param: Option<String>,
    /// A machine-readable reason (`model_not_found`, `context_length_exceeded`, ...).
    pub code: Option<&'static str>,
    /// Seconds a client should wait before retrying (429 and 503 only).
    pub retry_after_s: Option<u32>,
}

#[derive(Serialize)]
struct Body<'a> {
    error: Inner<'a>,
}

#[derive(Serialize)]
struct Inner<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: ErrorKind,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

impl ApiError {
    fn new(status: StatusCode, kind: ErrorKind, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            kind,
            message: message.into(),
            param: None,
            code: None,
            retry_after_s: None,
        }
    }

    /// 400: the request is malformed; `param` names the field.
    pub fn invalid(param: Option<&str>, message: impl Into<String>) -> ApiError {
        let mut e = ApiError::new(
            StatusCode::BAD_REQUEST,
            ErrorKind::InvalidRequestError,
            message,
        );
        e.param = param.map(str::to_string);
        e
    }

    pub fn model_not_found(model: &str) -> ApiError {
        let mut e = ApiError::new(
            StatusCode::NOT_FOUND,
            ErrorKind::InvalidRequestError,
            format!("the model `{model}` does not exist (GET /v1/models lists the base, the experts and `auto`)"),
        );
        e.param = Some("model".into());
        e.code = Some("model_not_found");
        e
    }

    pub fn context_length(param: &str, message: impl Into<String>) -> ApiError {
        let mut e = ApiError::invalid(Some(param), message);
        e.code = Some("context_length_exceeded");
        e
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, ErrorKind::NotFoundError, message)
    }

    pub fn method_not_allowed(path: &str) -> ApiError {
        ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            ErrorKind::InvalidRequestError,
            format!("method not allowed on {path}"),
        )
    }

    pub fn payload_too_large(limit: usize) -> ApiError {
        let mut e = ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::InvalidRequestError,
            format!("request body is larger than the limit of {limit} bytes"),
        );
        e.code = Some("request_too_large");
        e
    }

    pub fn unsupported_media_type() -> ApiError {
        ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ErrorKind::InvalidRequestError,
            "the body must be JSON (Content-Type: application/json)",
        )
    }

    pub fn unauthorized(message: impl Into<String>) -> ApiError {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            ErrorKind::AuthenticationError,
            message,
        )
    }

    pub fn forbidden(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, ErrorKind::PermissionError, message)
    }

    pub fn conflict(message: impl Into<String>) -> ApiError {
        ApiError::new(
            StatusCode::CONFLICT,
            ErrorKind::InvalidRequestError,
            message,
        )
    }

    /// 429: the queue is full; retry later.
    pub fn queue_full(retry_after_s: u32) -> ApiError {
        let mut e = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            ErrorKind::RateLimitError,
            "the server is at capacity (request queue full); retry later",
        );
        e.code = Some("queue_full");
        e.retry_after_s = Some(retry_after_s.max(1));
        e
    }

    /// 503: the server is shutting down.
    pub fn shutting_down() -> ApiError {
        let mut e = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::ServerError,
            "the server is shutting down",
        );
        e.code = Some("shutting_down");
        e.retry_after_s = Some(SHUTDOWN_RETRY_AFTER_S);
        e
    }

    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorKind::ServerError,
            message,
        )
    }

    /// The JSON body (also used as an SSE `data:` payload when a stream fails).
    pub fn body_json(&self) -> String {
        let body = Body {
            error: Inner {
                message: &self.message,
                kind: self.kind,
                param: self.param.as_deref(),
                code: self.code,
            },
        };
        serde_json::to_string(&body).unwrap_or_else(|_| {
            r#"{"error":{"message":"error","type":"server_error","param":null,"code":null}}"#.into()
        })
    }
}

/// `Retry-After` for 503 while shutting down: long enough for a restart.
const SHUTDOWN_RETRY_AFTER_S: u32 = 10;

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status.as_u16(), self.message)
    }
}

impl std::error::Error for ApiError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_has_openai_shape() {
        let e = ApiError::invalid(Some("max_tokens"), "max_tokens must be ≥ 1");
        let v: serde_json::Value = serde_json::from_str(&e.body_json()).unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["param"], "max_tokens");
        assert_eq!(v["error"]["message"], "max_tokens must be ≥ 1");
        assert!(v["error"]["code"].is_null());
        let e = ApiError::model_not_found("nope");
        let v: serde_json::Value = serde_json::from_str(&e.body_json()).unwrap();
        assert_eq!(v["error"]["code"], "model_not_found");
        assert_eq!(e.status, StatusCode::NOT_FOUND);
    }

    #[test]
    fn back_pressure_carries_retry_after() {
        assert_eq!(ApiError::queue_full(0).retry_after_s, Some(1));
        assert_eq!(
            ApiError::queue_full(0).status,
            StatusCode::TOO_MANY_REQUESTS
        );
        assert_eq!(
            ApiError::shutting_down().status,
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert!(ApiError::shutting_down().retry_after_s.is_some());
    }
}
