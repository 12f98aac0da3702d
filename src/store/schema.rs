// The diesel schema, written to match `migrations/postgres` (what `diesel print-schema` prints for
// it); the SQLite migrations create the same columns. The conformance suite runs every query on
// both backends, so a drift fails a test.

diesel::table! {
    batches (id) {
        id -> BigInt,
        public_id -> Text,
        name -> Text,
        campaign_id -> Nullable<Text>,
        content -> Text,
        url -> Nullable<Text>,
        provider -> Text,
        message_type -> Text,
        schedule_at -> Nullable<Timestamp>,
        partition_count -> Integer,
        state -> Text,
        resume_to -> Nullable<Text>,
        version -> BigInt,
        steps -> Text,
        recipients -> BigInt,
        processed -> BigInt,
        valid -> BigInt,
        invalid -> BigInt,
        duplicates -> BigInt,
        opted_out -> BigInt,
        segments -> BigInt,
        restarts -> Integer,
        conditions -> Text,
        error -> Nullable<Text>,
        created_at -> Timestamp,
        updated_at -> Timestamp,
        started_at -> Nullable<Timestamp>,
        finished_at -> Nullable<Timestamp>,
        failure_threshold -> Double,
        preparation_run -> BigInt,
        parent_id -> Nullable<Text>,
    }
}

diesel::table! {
    preparation_chunks (batch_id, last_recipient_id) {
        batch_id -> BigInt,
        first_recipient_id -> BigInt,
        last_recipient_id -> BigInt,
    }
}

diesel::table! {
    recipients (id) {
        id -> BigInt,
        batch_id -> BigInt,
        phone -> Text,
        vars -> Nullable<Text>,
    }
}

diesel::table! {
    messages (id) {
        id -> BigInt,
        batch_id -> BigInt,
        partition -> Integer,
        recipient_id -> BigInt,
        phone -> Text,
        body -> Text,
        encoding -> Text,
        segments -> Integer,
        status -> SmallInt,
        attempts -> Integer,
        next_attempt_at -> Nullable<Timestamp>,
        provider_message_id -> Nullable<Text>,
        error -> Nullable<Text>,
        updated_at -> Timestamp,
        claimed_by -> Nullable<Text>,
        delivered_at -> Nullable<Timestamp>,
    }
}

diesel::table! {
    partitions (batch_id, idx) {
        batch_id -> BigInt,
        idx -> Integer,
        total -> BigInt,
        sent -> BigInt,
        delivered -> BigInt,
        failed -> BigInt,
        cancelled -> BigInt,
        unknown -> BigInt,
        updated_at -> Timestamp,
    }
}

diesel::table! {
    checkpoints (batch_id, step) {
        batch_id -> BigInt,
        step -> Text,
        position -> BigInt,
        updated_at -> Timestamp,
    }
}

diesel::table! {
    opt_outs (phone) {
        phone -> Text,
        created_at -> Timestamp,
        source -> Text,
    }
}

diesel::table! {
    instances (id) {
        id -> Text,
        heartbeat_at -> Timestamp,
    }
}

diesel::table! {
    leases (batch_id) {
        batch_id -> BigInt,
        owner -> Text,
        expires_at -> Timestamp,
    }
}

diesel::table! {
    receipt_keys (receipt_key) {
        receipt_key -> Text,
        message_id -> BigInt,
        done -> Bool,
    }
}

diesel::table! {
    pending_receipts (id) {
        id -> BigInt,
        receipt_key -> Text,
        delivered -> Bool,
        error -> Nullable<Text>,
        received_at -> Timestamp,
        tries -> Integer,
        next_at -> Timestamp,
    }
}

diesel::joinable!(leases -> batches (batch_id));
diesel::joinable!(recipients -> batches (batch_id));
diesel::joinable!(messages -> batches (batch_id));
diesel::joinable!(partitions -> batches (batch_id));
diesel::joinable!(checkpoints -> batches (batch_id));

diesel::allow_tables_to_appear_in_same_query!(
    batches,
    recipients,
    messages,
    partitions,
    checkpoints,
    opt_outs,
    instances,
    leases,
    preparation_chunks,
    receipt_keys,
    pending_receipts,
);
