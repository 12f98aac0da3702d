//! The machine's ceiling for the one-batch benchmark: raw `COPY` and `UPDATE` on PostgreSQL with
//! no service in between.

use std::io::Write;
use std::time::Instant;

pub(crate) struct Ceiling {
    pub(crate) copy_rows_per_s: f64,
    pub(crate) update_rows_per_s: f64,
}

/// What PostgreSQL does on this machine with no service in between: `COPY` of `n` rows shaped
/// like messages into a copy of the messages table, then `UPDATE` passes marking them sent in
/// chunks of `chunk` ids (one statement per chunk, as a worker records a task).
pub(crate) fn measure_ceiling(db_url: &str, n: usize, chunk: usize) -> anyhow::Result<Ceiling> {
    use futures_util::SinkExt;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let (client, conn) = tokio_postgres::connect(db_url, tokio_postgres::NoTls).await?;
        let driver = tokio::spawn(conn);
        client
            .batch_execute(
                "DROP TABLE IF EXISTS ceiling_messages;
                 CREATE TABLE ceiling_messages (LIKE messages INCLUDING ALL);",
            )
            .await?;
        // `LIKE` copies columns, defaults and indexes but not storage parameters: the copy gets
        // the table's own (its fillfactor leaves room on each page for the updates).
        let options: Option<String> = client
            .query_one(
                "SELECT array_to_string(reloptions, ', ') FROM pg_class \
                 WHERE oid = 'messages'::regclass",
                &[],
            )
            .await?
            .get(0);
        if let Some(options) = options.filter(|o| !o.is_empty()) {
            client
                .batch_execute(&format!("ALTER TABLE ceiling_messages SET ({options})"))
                .await?;
        }
        let t = Instant::now();
        let sink = client
            .copy_in(
                "COPY ceiling_messages (batch_id, partition, recipient_id, phone, body, encoding, \
                 segments, updated_at) FROM STDIN",
            )
            .await?;
        let mut sink = std::pin::pin!(sink);
        let mut buf = Vec::with_capacity(1 << 20);
        for i in 0..n {
            writeln!(
                buf,
                "1\t{}\t{i}\t+86138{:08}\tHi Ann, your order from Shanghai ships today: https://shop.example/o\tgsm7\t1\t2026-01-01 00:00:00",
                i % 4,
                10_000_000 + i
            )?;
            if buf.len() > (1 << 20) {
                sink.send(bytes::Bytes::from(std::mem::take(&mut buf))).await?;
            }
        }
        sink.send(bytes::Bytes::from(buf)).await?;
        sink.as_mut().finish().await?;
        let copy_s = t.elapsed().as_secs_f64();

        let ids: Vec<i64> = client
            .query("SELECT id FROM ceiling_messages ORDER BY id", &[])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let t = Instant::now();
        for ids in ids.chunks(chunk) {
            client
                .execute(
                    "UPDATE ceiling_messages SET status = 2, updated_at = now() \
                     WHERE id = ANY($1) AND status = 0",
                    &[&ids],
                )
                .await?;
        }
        let update_s = t.elapsed().as_secs_f64();
        client.batch_execute("DROP TABLE ceiling_messages").await?;
        // Write what the ceiling dirtied to disk now rather than in a checkpoint during the run
        // (needs a superuser or pg_checkpoint; without, the run may share the disk with it).
        if let Err(e) = client.batch_execute("CHECKPOINT").await {
            eprintln!("ceiling: CHECKPOINT not allowed ({e}); the run may overlap a checkpoint");
        }
        drop(client);
        let _ = driver.await;
        Ok(Ceiling {
            copy_rows_per_s: n as f64 / copy_s,
            update_rows_per_s: n as f64 / update_s,
        })
    })
}
