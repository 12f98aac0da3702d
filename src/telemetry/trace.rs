//! The trace a piece of work belongs to, carried where the current span cannot follow: from a
//! request to the batch steps it starts (through the registry and the supervisor's mailboxes),
//! from the Delivery step to the worker that carries out a task (a worker's mailbox, or a
//! RabbitMQ message's headers, possibly to another instance).
//!
//! It holds the W3C trace context (`traceparent`, `tracestate`) of the span that handed the work
//! over, nothing else: no reference to that span, which may have ended long before (a request
//! answers at once; the batch it started runs for hours). Empty while traces are off.

use std::future::Future;
use std::marker::PhantomData;

use futures_util::future::Either;
use opentelemetry::context::{FutureExt as _, WithContext};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanContext, TraceContextExt as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// A span's W3C trace context, to parent spans started elsewhere (empty: they start a trace).
#[derive(Debug, Clone, Default)]
pub struct TraceContext(Option<SpanContext>);

impl TraceContext {
    /// The context of the current span (empty when traces are off or nothing is traced).
    pub fn current() -> Self {
        let cx = tracing::Span::current().context();
        Self::of(&cx)
    }

    /// The context carried by these headers (`traceparent`, `tracestate`; `get` reads one by
    /// its lowercase name); empty when there is none or it is malformed.
    pub fn from_headers<'a>(get: impl Fn(&str) -> Option<&'a str>) -> Self {
        Self::of(&TraceContextPropagator::new().extract(&Lookup(get, PhantomData)))
    }

    /// The headers that carry this context (`traceparent`, and `tracestate` when it has one);
    /// none when empty.
    pub fn headers(&self) -> Vec<(String, String)> {
        let mut headers = Headers(Vec::new());
        if self.0.is_some() {
            TraceContextPropagator::new().inject_context(&self.otel(), &mut headers);
        }
        headers.0
    }

    /// Whether it carries no context.
    pub fn is_empty(&self) -> bool {
        self.0.is_none()
    }

    /// The trace id, 32 lowercase hex digits (for logs).
    pub fn trace_id(&self) -> Option<String> {
        self.0.as_ref().map(|c| format!("{:032x}", c.trace_id()))
    }

    /// Makes `span` a child of this context. False when traces are off (then nothing changes).
    pub fn adopt(&self, span: &tracing::Span) -> bool {
        span.set_parent(self.otel()).is_ok()
    }

    /// `future`, in whose polls this context is the current one: a span it starts outside any
    /// other (an `#[instrument]`ed function it calls first) is a child of this context. An
    /// empty context leaves the future as it is: making a context current costs something at
    /// every poll, and a task's future is polled at every message's answer (with an SMPP
    /// provider that halved the messages a second while traces were off).
    pub fn attach<F: Future>(&self, future: F) -> Either<WithContext<F>, F> {
        if self.is_empty() {
            Either::Right(future)
        } else {
            Either::Left(future.with_context(self.otel()))
        }
    }

    fn of(cx: &opentelemetry::Context) -> Self {
        let span = cx.span();
        let context = span.span_context();
        TraceContext(context.is_valid().then(|| context.clone()))
    }

    fn otel(&self) -> opentelemetry::Context {
        match &self.0 {
            Some(c) => opentelemetry::Context::new().with_remote_span_context(c.clone()),
            None => opentelemetry::Context::new(),
        }
    }
}

/// The trace id of `span` (32 lowercase hex digits), once it has one.
pub fn span_trace_id(span: &tracing::Span) -> Option<String> {
    TraceContext::of(&span.context()).trace_id()
}

/// Headers read through a function (the `'a` of what it answers outlives any borrow of it).
struct Lookup<'a, F>(F, PhantomData<&'a str>);

impl<'a, F: Fn(&str) -> Option<&'a str>> Extractor for Lookup<'a, F> {
    fn get(&self, key: &str) -> Option<&str> {
        (self.0)(key)
    }

    fn keys(&self) -> Vec<&str> {
        // Only asked by propagators that read every header (baggage), not this one.
        Vec::new()
    }
}

struct Headers(Vec<(String, String)>);

impl Injector for Headers {
    fn set(&mut self, key: &str, value: String) {
        self.0.push((key.to_owned(), value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn headers_round_trip() {
        let cx = TraceContext::from_headers(|name| match name {
            "traceparent" => Some(PARENT),
            "tracestate" => Some("vendor=a"),
            _ => None,
        });
        assert_eq!(
            cx.trace_id().as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        let headers = cx.headers();
        assert!(
            headers.contains(&("traceparent".into(), PARENT.into())),
            "{headers:?}"
        );
        assert!(
            headers.contains(&("tracestate".into(), "vendor=a".into())),
            "{headers:?}"
        );
    }

    #[test]
    fn nothing_or_garbage_is_empty() {
        assert!(TraceContext::from_headers(|_| None).is_empty());
        assert!(TraceContext::from_headers(|_| Some("00-zz-yy-01")).is_empty());
        assert!(TraceContext::default().headers().is_empty());
        // No subscriber with the OpenTelemetry layer: nothing is traced.
        assert!(TraceContext::current().is_empty());
    }
}
