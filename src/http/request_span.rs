//! The span of each request: tracing-actix-web's (method, route, status, request id), continuing
//! the caller's trace when the request carries a W3C `traceparent` header, and with the trace id
//! in its `trace_id` field while traces are exported (so that log lines name it).

use actix_web::Error;
use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use tracing::Span;
use tracing_actix_web::{DefaultRootSpanBuilder, RootSpanBuilder};

use crate::telemetry::trace::TraceContext;

/// The root span builder of `TracingLogger`.
pub struct RequestSpan;

impl RootSpanBuilder for RequestSpan {
    fn on_request_start(request: &ServiceRequest) -> Span {
        let span = tracing_actix_web::root_span!(request);
        let caller = TraceContext::from_headers(|name| {
            request.headers().get(name).and_then(|v| v.to_str().ok())
        });
        // Without the OpenTelemetry layer nothing is traced, and `trace_id` stays empty.
        if caller.adopt(&span)
            && let Some(id) = crate::telemetry::trace::span_trace_id(&span)
        {
            span.record("trace_id", tracing::field::display(id));
        }
        span
    }

    fn on_request_end<B: MessageBody>(span: Span, outcome: &Result<ServiceResponse<B>, Error>) {
        DefaultRootSpanBuilder::on_request_end(span, outcome);
    }
}
