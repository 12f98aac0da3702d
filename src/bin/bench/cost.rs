//! What the many-batches phase cost, process by process: the CPU time of the servers under test,
//! of PostgreSQL (every backend, and those that exited), of RabbitMQ and of the benchmark
//! itself, and the statements PostgreSQL ran for the bench's database when it loads
//! `pg_stat_statements` (`shared_preload_libraries`). Their sum is what one more small batch
//! takes from the machine, and so from a large batch running beside it.

use std::collections::HashSet;

/// `/proc/<pid>/stat` counts CPU time in clock ticks, which Linux fixes at 100 a second.
const TICKS: f64 = 100.0;

/// CPU seconds used so far, by process group.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Cpu {
    server: f64,
    postgres: f64,
    rabbitmq: f64,
    client: f64,
}

impl Cpu {
    /// The counts now; `servers` are the pids of the instances under test.
    pub(crate) fn now(servers: &[u32]) -> Cpu {
        let servers: HashSet<String> = servers.iter().map(u32::to_string).collect();
        let mut cpu = Cpu::default();
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return cpu;
        };
        for entry in dir.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !name.bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            let Some(stat) = Stat::read(&name) else {
                continue;
            };
            if servers.contains(&name) {
                cpu.server += stat.own;
            } else if stat.comm == "postgres" {
                // The postmaster's children's time holds the backends that exited.
                cpu.postgres += stat.own + stat.children;
            } else if stat.comm == "beam.smp" {
                cpu.rabbitmq += stat.own + stat.children;
            }
        }
        if let Some(me) = Stat::read("self") {
            cpu.client = me.own;
        }
        cpu
    }

    /// Prints `cpu_ms_per_batch` from `start` to now over `batches`.
    pub(crate) fn print_since(start: Cpu, servers: &[u32], batches: usize) {
        let end = Cpu::now(servers);
        let per = |a: f64, b: f64| (b - a) * 1000.0 / batches.max(1) as f64;
        let parts = [
            per(start.server, end.server),
            per(start.postgres, end.postgres),
            per(start.rabbitmq, end.rabbitmq),
            per(start.client, end.client),
        ];
        println!(
            "cpu_ms_per_batch: server {:.2}, postgres {:.2}, rabbitmq {:.2}, client {:.2}, total {:.2}",
            parts[0],
            parts[1],
            parts[2],
            parts[3],
            parts.iter().sum::<f64>()
        );
    }
}

/// The fields of `/proc/<pid>/stat` this module reads.
struct Stat {
    comm: String,
    /// utime + stime, in seconds.
    own: f64,
    /// cutime + cstime (children waited for), in seconds.
    children: f64,
}

impl Stat {
    fn read(pid: &str) -> Option<Stat> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // `pid (comm) state ppid …`: the name may hold spaces and parentheses, so it ends at the
        // last `)`.
        let open = text.find('(')?;
        let close = text.rfind(')')?;
        let comm = text.get(open + 1..close)?.to_string();
        let fields: Vec<f64> = text
            .get(close + 1..)?
            .split_whitespace()
            .map(|f| f.parse().unwrap_or(0.0))
            .collect();
        // After the name: state is field 3; utime, stime, cutime, cstime are fields 14 to 17.
        let field = |n: usize| fields.get(n - 3).copied().unwrap_or(0.0);
        Some(Stat {
            comm,
            own: (field(14) + field(15)) / TICKS,
            children: (field(16) + field(17)) / TICKS,
        })
    }
}

/// Counts the statements PostgreSQL ran for one database through `pg_stat_statements`.
pub(crate) struct Statements {
    rt: tokio::runtime::Runtime,
    client: tokio_postgres::Client,
}

impl Statements {
    /// On the bench's database; `None` (with the reason printed) when PostgreSQL does not load
    /// the extension.
    pub(crate) fn connect(db_url: &str) -> Option<Statements> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .ok()?;
        let connected = rt.block_on(async {
            let (client, conn) = tokio_postgres::connect(db_url, tokio_postgres::NoTls).await?;
            tokio::spawn(conn);
            client
                .batch_execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
                .await?;
            anyhow::Ok(client)
        });
        let checked = connected.and_then(|client| {
            let statements = Statements { rt, client };
            statements.count().map(|_| statements)
        });
        checked
            .inspect_err(|e| println!("statements_per_batch: n/a ({e})"))
            .ok()
    }

    fn count(&self) -> anyhow::Result<i64> {
        let row = self.rt.block_on(self.client.query_one(
            "SELECT CAST(COALESCE(sum(calls), 0) AS BIGINT) FROM pg_stat_statements \
             WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())",
            &[],
        ))?;
        Ok(row.get(0))
    }

    /// The count now, to subtract from a later one.
    pub(crate) fn mark(&self) -> Option<i64> {
        self.count().ok()
    }

    /// Prints `statements_per_batch` since `mark`.
    pub(crate) fn print_since(&self, mark: Option<i64>, batches: usize) {
        if let (Some(start), Ok(end)) = (mark, self.count()) {
            println!(
                "statements_per_batch: {:.1} ({} in all)",
                (end - start) as f64 / batches.max(1) as f64,
                end - start
            );
        }
    }
}
