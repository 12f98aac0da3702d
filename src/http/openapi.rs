//! The OpenAPI 3 document of the admin API, served at `GET /openapi.json`: generated from the
//! handlers' `#[utoipa::path]` annotations and the views' `ToSchema` derives, so that it cannot
//! drift from the code. docs/api.md is the prose form of the same contract.
//!
//! The names of the domain's enums (states, statuses, message types) are listed from the enums'
//! own `ALL`, so a new variant shows up in the document by itself. `domain` stays free of
//! documentation concerns: the schema impls live here.

use std::borrow::Cow;
use std::sync::OnceLock;

use actix_web::HttpResponse;
use serde::Serialize;
use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::openapi::{InfoBuilder, OpenApi as Document, RefOr};
use utoipa::{Modify, OpenApi, PartialSchema, ToSchema};

use crate::domain::batch::{MessageStatus, MessageType};
use crate::domain::state::{BatchState, Step, StepStatus};

use super::error::ErrorBody;

/// The name of the security scheme every `/v1/` operation requires when `admin.token` is set
/// (the handlers' `security(("bearer" = []))` attributes take it only as a literal).
pub const BEARER: &str = "bearer";
/// The scheme of the gateways' webhooks: a bearer token too, their provider's `webhook_token`.
pub const WEBHOOK: &str = "webhook";

/// Implements `ToSchema` for a domain enum as a string schema listing its API names.
macro_rules! name_schema {
    ($ty:ty, $name:literal, $description:literal) => {
        impl PartialSchema for $ty {
            fn schema() -> RefOr<Schema> {
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .description(Some($description))
                    .enum_values(Some(<$ty>::ALL.iter().map(|v| v.as_str())))
                    .into()
            }
        }

        impl ToSchema for $ty {
            fn name() -> Cow<'static, str> {
                Cow::Borrowed($name)
            }
        }
    };
}

name_schema!(
    BatchState,
    "BatchState",
    "A batch's state; `completed`, `failed` and `cancelled` are final."
);
name_schema!(
    StepStatus,
    "StepStatus",
    "The status of one step of a batch."
);
name_schema!(Step, "Step", "A step of a batch.");
name_schema!(
    MessageStatus,
    "MessageStatus",
    "Where one message is on its way to the recipient."
);
name_schema!(
    MessageType,
    "MessageType",
    "The kind of messages in a batch."
);

/// The statuses a partition is shown with.
pub struct PartitionStatus;

impl PartitionStatus {
    /// Every status `views::PartitionView` can show.
    pub const ALL: [&'static str; 4] = [
        StepStatus::Initial.as_str(),
        StepStatus::Running.as_str(),
        StepStatus::Paused.as_str(),
        StepStatus::Completed.as_str(),
    ];
}

impl PartialSchema for PartitionStatus {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .description(Some("The delivery status of one partition."))
            .enum_values(Some(PartitionStatus::ALL))
            .into()
    }
}

impl ToSchema for PartitionStatus {}

/// A step's progress (documents `domain::batch::Progress`, whose serialization the unit tests
/// below compare with this).
#[derive(Serialize, ToSchema)]
#[schema(as = Progress)]
pub struct ProgressDoc {
    /// Items the step has to process.
    pub total: i64,
    /// Items processed so far, successfully or not.
    pub processed: i64,
    /// Processed items that succeeded.
    pub success: i64,
    /// Processed items that failed.
    pub failed: i64,
    /// `processed / total` in percent, one decimal.
    #[schema(minimum = 0.0, maximum = 100.0)]
    pub percentage: f64,
}

/// A condition of a batch, in the manner of Kubernetes conditions (documents
/// `actors::supervisor::Condition`).
#[derive(Serialize, ToSchema)]
#[schema(as = Condition)]
pub struct ConditionDoc {
    /// `Prepared`, `Delivered`, `Paused`, `Cancelled`, `Failed`, `Restarted`.
    #[serde(rename = "type")]
    pub kind: String,
    /// `True` or `False`.
    pub status: String,
    /// A CamelCase reason.
    pub reason: String,
    /// A human sentence.
    pub message: String,
    /// When the status last changed.
    pub last_transition_time: chrono::DateTime<chrono::Utc>,
}

/// `GET /healthz`.
#[derive(Serialize, ToSchema)]
pub struct Health {
    /// Always `ok`.
    #[schema(value_type = String, pattern = "^ok$")]
    pub status: &'static str,
}

/// `GET /readyz`.
#[derive(Serialize, ToSchema)]
pub struct Readiness {
    /// `healthy` when every check is `ok`, else `unhealthy`.
    #[schema(value_type = String, pattern = "^(healthy|unhealthy)$")]
    pub status: &'static str,
    /// When the checks ran.
    pub timestamp: chrono::DateTime<chrono::Utc>,
    /// Each dependency's check.
    pub checks: ReadinessChecks,
    /// The sessions of each provider that keeps connections open (SMPP accounts), by name:
    /// shown, never making the instance unready.
    pub providers: std::collections::BTreeMap<String, ProviderCheck>,
}

/// A provider's sessions in [`Readiness`].
#[derive(Serialize, ToSchema)]
pub struct ProviderCheck {
    /// One entry per session this instance opens.
    pub sessions: Vec<SessionCheck>,
}

/// One session in [`ProviderCheck`].
#[derive(Serialize, ToSchema)]
pub struct SessionCheck {
    /// `connecting`, `bound`, `refused` (the bind was refused), `down` (waiting to reconnect)
    /// or `closed`.
    #[schema(value_type = String, pattern = "^(connecting|bound|refused|down|closed)$")]
    pub state: &'static str,
    /// Why it is refused (the status, `ESME_RBINDFAIL (0x0000000D)`) or down.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The checks of [`Readiness`]: `ok`, or the failed check's error text.
#[derive(Serialize, ToSchema)]
pub struct ReadinessChecks {
    /// The database.
    pub database: String,
    /// The broker (always `ok` with the in-process transport).
    pub queue: String,
}

/// Adds the bearer-token security scheme and the document's title.
struct Extras;

impl Modify for Extras {
    fn modify(&self, doc: &mut Document) {
        doc.info = InfoBuilder::new()
            .title("smsbatch admin API")
            .version(env!("CARGO_PKG_VERSION"))
            .description(Some(
                "Batches of SMS: create, add recipients, start, pause, resume, cancel, retry, \
                 and watch. With `admin.token` set, every `/v1/` operation needs \
                 `Authorization: Bearer <token>`; the probes, `/metrics` and this document \
                 never do. Every 4xx and 5xx answer has the `ErrorBody` body.",
            ))
            .build();
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            BEARER,
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
        components.add_security_scheme(
            WEBHOOK,
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
    }
}

/// The document: every route of `http::routes`.
#[derive(OpenApi)]
#[openapi(
    paths(
        super::batches::create_batch,
        super::batches::list_batches,
        super::batches::get_batch,
        super::recipients::upload_recipients,
        super::messages::list_messages,
        super::resend::resend_batch,
        super::opt_outs::list_opt_outs,
        super::opt_outs::add_opt_outs,
        super::opt_outs::get_opt_out,
        super::opt_outs::delete_opt_out,
        super::webhooks::post_receipts,
        super::webhooks::post_inbound,
        super::actions::start_batch,
        super::actions::pause_batch,
        super::actions::resume_batch,
        super::actions::cancel_batch,
        super::actions::retry_batch,
        super::probes::healthz,
        super::probes::readyz,
        super::probes::metrics,
        openapi_json,
    ),
    components(schemas(ErrorBody, PartitionStatus, BatchState, StepStatus, MessageStatus)),
    modifiers(&Extras),
    tags(
        (name = "batches", description = "Batches and their lifecycle (docs/api.md)."),
        (name = "opt-outs", description = "Numbers that said stop: no batch prepared after they are listed messages them."),
        (name = "webhooks", description = "What `http` gateways post back (receipts, inbound messages), with their provider's `webhook_token`."),
        (name = "operations", description = "Probes, metrics and this document."),
    ),
)]
pub struct ApiDoc;

/// The document as JSON, built once.
pub fn document() -> &'static str {
    static JSON: OnceLock<String> = OnceLock::new();
    JSON.get_or_init(|| {
        ApiDoc::openapi().to_json().unwrap_or_else(|e| {
            // Serialising a tree of strings and maps cannot fail; answer a valid document if it
            // ever does.
            tracing::error!(error = %e, "OpenAPI document not serialisable.");
            r#"{"openapi":"3.1.0","info":{"title":"smsbatch admin API","version":"0"},"paths":{}}"#
                .to_string()
        })
    })
}

/// The OpenAPI document of this API.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "operations",
    operation_id = "openapi",
    responses((status = 200, description = "The OpenAPI 3 document", content_type = "application/json", body = Object)),
)]
pub async fn openapi_json() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .body(document())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::BTreeSet;

    use serde_json::Value;

    use super::*;
    use crate::domain::batch::Progress;

    fn doc() -> Value {
        serde_json::from_str(document()).unwrap()
    }

    fn keys(v: &Value) -> BTreeSet<String> {
        v.as_object().unwrap().keys().cloned().collect()
    }

    fn schema_properties(name: &str) -> BTreeSet<String> {
        keys(&doc()["components"]["schemas"][name]["properties"])
    }

    #[test]
    fn progress_schema_matches_its_serialisation() {
        let real = serde_json::to_value(Progress::new(10, 4, 3, 1)).unwrap();
        assert_eq!(keys(&real), schema_properties("Progress"));
    }

    #[test]
    fn condition_schema_matches_its_serialisation() {
        let real = serde_json::to_value(crate::domain::lifecycle::Condition {
            kind: "Prepared".into(),
            status: "True".into(),
            reason: "Completed".into(),
            message: "m".into(),
            last_transition_time: chrono::Utc::now(),
        })
        .unwrap();
        assert_eq!(keys(&real), schema_properties("Condition"));
    }

    #[test]
    fn session_state_pattern_lists_every_reported_state() {
        let pattern =
            &doc()["components"]["schemas"]["SessionCheck"]["properties"]["state"]["pattern"];
        let states = crate::provider::SessionReport::STATES.join("|");
        assert_eq!(pattern.as_str(), Some(format!("^({states})$").as_str()));
    }

    #[test]
    fn enums_list_the_domain_names() {
        let doc = doc();
        let names = |schema: &str| -> Vec<String> {
            doc["components"]["schemas"][schema]["enum"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap().to_string())
                .collect()
        };
        assert_eq!(
            names("BatchState"),
            [
                "initial",
                "scheduled",
                "preparing",
                "delivering",
                "paused",
                "completed",
                "failed",
                "cancelled"
            ]
        );
        assert_eq!(
            names("MessageStatus"),
            [
                "pending",
                "sending",
                "sent",
                "delivered",
                "failed",
                "cancelled"
            ]
        );
        assert_eq!(
            names("StepStatus"),
            [
                "initial",
                "ready",
                "running",
                "paused",
                "completed",
                "failed"
            ]
        );
        let codes = names("ErrorCode");
        for code in [
            "bad_request",
            "bad_csv",
            "unauthorized",
            "not_found",
            "invalid_transition",
            "too_large",
            "invalid",
            "unavailable",
        ] {
            assert!(codes.iter().any(|c| c == code), "{code} in {codes:?}");
        }
    }

    #[test]
    fn every_v1_operation_requires_the_token_and_the_probes_do_not() {
        let doc = doc();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                let secured_by = |scheme: &str| {
                    op.get("security").is_some_and(|s| {
                        s.as_array()
                            .is_some_and(|a| a.iter().any(|r| r.get(scheme).is_some()))
                    })
                };
                // The gateways' webhooks take their provider's token instead.
                let webhook = path.starts_with("/v1/providers/");
                assert_eq!(secured_by(WEBHOOK), webhook, "{method} {path}: webhook");
                assert_eq!(
                    secured_by(BEARER),
                    path.starts_with("/v1/") && !webhook,
                    "{method} {path}: security {:?}",
                    op.get("security")
                );
                if path.starts_with("/v1/") {
                    assert!(
                        op["responses"].get("401").is_some(),
                        "{method} {path} documents 401"
                    );
                }
            }
        }
    }
}
