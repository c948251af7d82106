//! A private `redis-server` for tests: started on a free port with its own directory, and
//! killable, pausable and restartable, so faults are provoked for real. Shared by the test
//! targets (`#[path]`-included). Never touches the machine's Redis on 6379.

use std::net::TcpListener as StdListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A free TCP port on 127.0.0.1 (the listener is closed again at once).
pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A private redis-server started by the test; killed on drop.
pub struct TestRedis {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
    /// Arguments added to every start (`--replicaof …`).
    extra: Vec<String>,
}

impl TestRedis {
    /// Starts a server on a free port, in a fresh directory, with no automatic persistence
    /// (`SAVE` still writes `dump.rdb` there, and a restart loads it) and `DEBUG` allowed from
    /// loopback (`DEBUG SLEEP`, `DEBUG POPULATE`).
    pub async fn start() -> Self {
        Self::start_with(&[]).await
    }

    /// Like [`TestRedis::start`], with `extra` arguments (`["--replicaof", "127.0.0.1 6400"]`).
    pub async fn start_with(extra: &[&str]) -> Self {
        Self::start_on(free_port(), extra).await
    }

    /// Like [`TestRedis::start_with`], on `port`.
    pub async fn start_on(port: u16, extra: &[&str]) -> Self {
        let dir = std::env::temp_dir().join(format!("runcache-test-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let mut redis = Self {
            port,
            dir,
            child: None,
            extra: extra.iter().map(|a| (*a).to_owned()).collect(),
        };
        redis.spawn().await;
        redis
    }

    async fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(["--enable-debug-command", "local"])
            .arg("--dir")
            .arg(&self.dir)
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start redis-server ({e}); install it with `apt-get install -y redis-server`")
            });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut c) = self.conn_once().await
                && redis::cmd("PING")
                    .query_async::<String>(&mut c)
                    .await
                    .is_ok()
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "redis-server did not start on port {}",
                self.port
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `redis://127.0.0.1:{port}`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The server's directory (where `SAVE` writes `dump.rdb`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    async fn conn_once(&self) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
        redis::Client::open(self.url())?
            .get_multiplexed_async_connection()
            .await
    }

    /// A new connection (panics if the server does not answer).
    pub async fn conn(&self) -> redis::aio::MultiplexedConnection {
        self.conn_once().await.expect("connect to test redis")
    }

    /// Whether the process is running (not killed).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// SIGKILL, no goodbye.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGSTOP: the process hangs, so connections are accepted but never answered (a
    /// blackholed Redis, unlike a killed one, which refuses connections at once).
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT after [`TestRedis::pause`].
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        let status = Command::new("kill")
            .args([sig, &pid])
            .status()
            .expect("kill");
        assert!(status.success());
    }

    /// Starts again on the same port and directory (a `SAVE`d snapshot is loaded).
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }

    /// `SAVE` now, and returns a copy of the snapshot file, so a later
    /// [`TestRedis::restart_from`] can bring this moment back (a Redis restarted from an
    /// older RDB file).
    pub async fn save_copy(&self) -> PathBuf {
        let _: String = redis::cmd("SAVE")
            .query_async(&mut self.conn().await)
            .await
            .expect("SAVE");
        let copy = self
            .dir
            .join(format!("saved-{}.rdb", uuid::Uuid::new_v4().simple()));
        std::fs::copy(self.dir.join("dump.rdb"), &copy).expect("copy dump.rdb");
        copy
    }

    /// Kills the server and starts it again from `saved` (see [`TestRedis::save_copy`]).
    pub async fn restart_from(&mut self, saved: &Path) {
        self.kill();
        std::fs::copy(saved, self.dir.join("dump.rdb")).expect("restore dump.rdb");
        self.spawn().await;
    }

    /// Kills the server and starts it again empty.
    pub async fn restart_empty(&mut self) {
        self.kill();
        let _ = std::fs::remove_file(self.dir.join("dump.rdb"));
        self.spawn().await;
    }

    /// Runs a command on a new connection and returns its reply.
    pub async fn cmd<T: redis::FromRedisValue>(&self, args: &[&str]) -> redis::RedisResult<T> {
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        cmd.query_async(&mut self.conn_once().await?).await
    }

    /// Like [`TestRedis::cmd`], on a connection without a response time-out, for commands
    /// that take long on purpose (`DEBUG POPULATE` of a million keys).
    pub async fn cmd_unbounded<T: redis::FromRedisValue>(
        &self,
        args: &[&str],
    ) -> redis::RedisResult<T> {
        let config = redis::AsyncConnectionConfig::new().set_response_timeout(None);
        let mut conn = redis::Client::open(self.url())?
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        cmd.query_async(&mut conn).await
    }

    /// How many times this server has run `command` (lowercase), from `INFO commandstats`.
    pub async fn command_calls(&self, command: &str) -> u64 {
        let stats: String = self
            .cmd(&["INFO", "commandstats"])
            .await
            .expect("INFO commandstats");
        let prefix = format!("cmdstat_{command}:calls=");
        stats
            .lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .and_then(|rest| rest.split(',').next()?.parse().ok())
            .unwrap_or(0)
    }

    /// Every key matching `pattern`, sorted (KEYS: test servers are small).
    pub async fn keys(&self, pattern: &str) -> Vec<String> {
        let mut keys: Vec<String> = redis::cmd("KEYS")
            .arg(pattern)
            .query_async(&mut self.conn().await)
            .await
            .expect("KEYS");
        keys.sort();
        keys
    }
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        if let Some(c) = &self.child {
            // A paused server would not die of SIGKILL until continued on some systems.
            let _ = Command::new("kill")
                .args(["-CONT", &c.id().to_string()])
                .status();
        }
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl TestRedis {
    /// Like [`TestRedis::save_copy`], but reports a failure instead of panicking (a fault
    /// schedule must not die of a snapshot it could not take).
    pub async fn try_save_copy(&self) -> Result<PathBuf, String> {
        let mut conn = self.conn_once().await.map_err(|e| e.to_string())?;
        let _: String = redis::cmd("SAVE")
            .query_async(&mut conn)
            .await
            .map_err(|e| e.to_string())?;
        let copy = self
            .dir
            .join(format!("saved-{}.rdb", uuid::Uuid::new_v4().simple()));
        std::fs::copy(self.dir.join("dump.rdb"), &copy).map_err(|e| e.to_string())?;
        Ok(copy)
    }
}

/// A master with one replica, watched by three real sentinels (`redis-server s.conf
/// --sentinel`, each with its own config file, which sentinels rewrite), quorum 2, a master
/// taken for down after 1 s.
pub struct TestSentinels {
    pub master: TestRedis,
    pub replica: TestRedis,
    pub ports: Vec<u16>,
    pub name: String,
    dir: PathBuf,
    children: Vec<Child>,
}

impl TestSentinels {
    pub async fn start() -> Self {
        // A diskless sync would first wait 5 s for more replicas.
        let master = TestRedis::start_with(&["--repl-diskless-sync-delay", "0"]).await;
        let of = format!("127.0.0.1 {}", master.port);
        let replica =
            TestRedis::start_with(&["--replicaof", &of, "--repl-diskless-sync-delay", "0"]).await;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let info: String = replica
                .cmd(&["INFO", "replication"])
                .await
                .unwrap_or_default();
            if info.contains("master_link_status:up") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the replica did not sync within 20 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let dir = std::env::temp_dir().join(format!("runcache-sentinel-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let name = "runcache-test".to_owned();
        let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let master_port = master.port;
        let mut sentinels = Self {
            master,
            replica,
            ports,
            name,
            dir,
            children: Vec::new(),
        };
        sentinels.spawn_sentinels(master_port);
        // Ready when every sentinel knows the master, its replica and the other sentinels.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let mut ready = true;
            for port in &sentinels.ports {
                let info: Option<Vec<String>> = sentinels
                    .ask(*port, &["SENTINEL", "master", &sentinels.name])
                    .await
                    .ok();
                let field = |name: &str| {
                    info.as_ref().and_then(|kv| {
                        kv.chunks(2)
                            .find(|p| p[0] == name)
                            .and_then(|p| p.get(1).cloned())
                    })
                };
                ready &= field("num-slaves").as_deref() == Some("1")
                    && field("num-other-sentinels").as_deref() == Some("2");
            }
            if ready {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "sentinels did not settle within 20 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        sentinels
    }

    /// Writes a fresh configuration for each sentinel (monitoring the master on
    /// `master_port`, configuration epoch 0) and starts them.
    fn spawn_sentinels(&mut self, master_port: u16) {
        let name = &self.name;
        for (i, port) in self.ports.iter().enumerate() {
            let conf = self.dir.join(format!("sentinel-{i}.conf"));
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\ndir {}\nsentinel monitor {name} 127.0.0.1 {master_port} 2\n\
                     sentinel down-after-milliseconds {name} 1000\nsentinel failover-timeout {name} 5000\n\
                     sentinel parallel-syncs {name} 1\n",
                    self.dir.display(),
                ),
            )
            .expect("sentinel config");
            let child = Command::new("redis-server")
                .arg(&conf)
                .arg("--sentinel")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start redis-server --sentinel");
            self.children.push(child);
        }
    }

    /// Kills the sentinels and starts them again on the same ports from a fresh configuration
    /// monitoring the master on `master_port`: sentinels redeployed without their state, which
    /// report configuration epoch 0 however many failovers came before. Returns once each
    /// names that master.
    pub async fn restart_fresh(&mut self, master_port: u16) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.children.clear();
        self.spawn_sentinels(master_port);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let mut named = 0;
            for port in &self.ports {
                if let Ok(Some((_, p))) = self
                    .ask::<Option<(String, u16)>>(
                        *port,
                        &["SENTINEL", "get-master-addr-by-name", &self.name],
                    )
                    .await
                    && p == master_port
                {
                    named += 1;
                }
            }
            if named == self.ports.len() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "restarted sentinels did not answer within 20 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The configuration epoch each sentinel reports for the master (`None`: no answer).
    pub async fn epochs(&self) -> Vec<Option<u64>> {
        let mut epochs = Vec::new();
        for port in &self.ports {
            let fields: Option<Vec<String>> = self
                .ask(*port, &["SENTINEL", "master", &self.name])
                .await
                .ok();
            epochs.push(fields.and_then(|kv| {
                kv.chunks(2)
                    .find(|p| p[0] == "config-epoch")
                    .and_then(|p| p.get(1)?.parse().ok())
            }));
        }
        epochs
    }

    /// `SENTINEL FAILOVER` on the first sentinel: a planned failover, the master staying up.
    pub async fn failover(&self) {
        self.try_failover().await.expect("SENTINEL FAILOVER");
    }

    /// Like [`TestSentinels::failover`], reporting a refusal (no good replica yet, a failover
    /// already under way) instead of panicking.
    pub async fn try_failover(&self) -> Result<(), String> {
        let reply: String = self
            .ask(self.ports[0], &["SENTINEL", "FAILOVER", &self.name])
            .await
            .map_err(|e| e.to_string())?;
        if reply == "OK" { Ok(()) } else { Err(reply) }
    }

    /// The data node on `port` (the master or the replica, whichever it is now).
    pub fn node(&self, port: u16) -> &TestRedis {
        if port == self.master.port {
            &self.master
        } else {
            &self.replica
        }
    }

    async fn ask<T: redis::FromRedisValue>(
        &self,
        port: u16,
        args: &[&str],
    ) -> redis::RedisResult<T> {
        let mut conn = redis::Client::open(format!("redis://127.0.0.1:{port}"))?
            .get_multiplexed_async_connection()
            .await?;
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        cmd.query_async(&mut conn).await
    }

    /// The sentinels' URLs.
    pub fn urls(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect()
    }

    /// The port of the master the first sentinel that answers names now.
    pub async fn master_port(&self) -> Option<u16> {
        for port in &self.ports {
            if let Ok(Some((_, p))) = self
                .ask::<Option<(String, u16)>>(
                    *port,
                    &["SENTINEL", "get-master-addr-by-name", &self.name],
                )
                .await
            {
                return Some(p);
            }
        }
        None
    }
}

impl Drop for TestSentinels {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A free port whose cluster bus port (port + 10000) is free too.
pub fn free_cluster_port() -> u16 {
    loop {
        let port = free_port();
        if port < 55_000 && StdListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}

/// A real Redis Cluster: `primaries` primaries with `replicas` replicas each, every node a
/// [`TestRedis`] (`--cluster-enabled yes`, node time-out 1 s), formed with `redis-cli
/// --cluster create` and ready once every node reports `cluster_state:ok` and every replica is
/// in sync. Killed on drop.
pub struct TestCluster {
    pub nodes: Vec<TestRedis>,
}

impl TestCluster {
    pub async fn start(primaries: usize, replicas: usize) -> Self {
        let mut nodes = Vec::new();
        for _ in 0..primaries * (1 + replicas) {
            let node = TestRedis::start_on(
                free_cluster_port(),
                &[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "1000",
                    "--repl-diskless-sync-delay",
                    "0",
                ],
            )
            .await;
            nodes.push(node);
        }
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .output()
            .expect("run redis-cli --cluster create (apt-get install -y redis-tools)");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let cluster = Self { nodes };
        cluster.wait_ok(primaries, replicas).await;
        cluster
    }

    /// Waits until every running node says the cluster is ok, `primaries` primaries hold
    /// every slot and each has `replicas` replicas in sync.
    pub async fn wait_ok(&self, primaries: usize, replicas: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut ok = true;
            for node in self.nodes.iter().filter(|n| n.is_running()) {
                let info: String = node.cmd(&["CLUSTER", "INFO"]).await.unwrap_or_default();
                ok &= info.contains("cluster_state:ok");
                let role: String = node.cmd(&["INFO", "replication"]).await.unwrap_or_default();
                if role.contains("role:slave") {
                    ok &= role.contains("master_link_status:up");
                }
            }
            ok &= self.primary_ports().await.len() == primaries;
            let running = self.nodes.iter().filter(|n| n.is_running()).count();
            ok &= running >= primaries * (1 + replicas);
            if ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the cluster did not settle within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `redis://127.0.0.1:{port}` of every node (the seeds).
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(TestRedis::url).collect()
    }

    /// The ports of the primaries that hold slots, as a running node sees them.
    pub async fn primary_ports(&self) -> Vec<u16> {
        for node in self.nodes.iter().filter(|n| n.is_running()) {
            let Ok(text) = node.cmd::<String>(&["CLUSTER", "NODES"]).await else {
                continue;
            };
            let mut ports: Vec<u16> = text
                .lines()
                .filter_map(|line| {
                    let f: Vec<&str> = line.split(' ').collect();
                    let master = f.get(2)?.split(',').any(|flag| flag == "master");
                    let failed = f.get(2)?.contains("fail");
                    let has_slots = f.len() > 8;
                    let port = f.get(1)?.split(['@', ':']).nth(1)?.parse().ok()?;
                    (master && !failed && has_slots).then_some(port)
                })
                .collect();
            ports.sort_unstable();
            return ports;
        }
        Vec::new()
    }

    /// The node on `port`.
    pub fn node(&mut self, port: u16) -> &mut TestRedis {
        self.nodes
            .iter_mut()
            .find(|n| n.port == port)
            .expect("a node of this cluster")
    }

    /// Runs a command through a cluster connection (routed by its key) and returns its reply.
    pub async fn cmd<T: redis::FromRedisValue>(&self, args: &[&str]) -> redis::RedisResult<T> {
        let mut conn = redis::cluster::ClusterClient::new(self.urls())?
            .get_async_connection()
            .await?;
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        cmd.query_async(&mut conn).await
    }

    /// The port of a replica of the primary on `port`, as that primary lists it.
    pub async fn replica_of(&self, primary: u16) -> Option<u16> {
        let node = self.nodes.iter().find(|n| n.port == primary)?;
        let info: String = node.cmd(&["INFO", "replication"]).await.ok()?;
        info.lines()
            .filter(|l| l.starts_with("slave"))
            .find_map(|l| {
                l.split(',')
                    .find_map(|f| f.strip_prefix("port=")?.parse().ok())
            })
    }

    /// Runs a command on the node on `port` itself.
    pub async fn node_cmd<T: redis::FromRedisValue>(
        &self,
        port: u16,
        args: &[&str],
    ) -> redis::RedisResult<T> {
        let node = self.nodes.iter().find(|n| n.port == port).expect("node");
        node.cmd(args).await
    }

    /// Every key matching `pattern` on the node on `port` (KEYS: test servers are small).
    pub async fn keys_on(&self, port: u16, pattern: &str) -> Vec<String> {
        let node = self.nodes.iter().find(|n| n.port == port).expect("node");
        node.keys(pattern).await
    }
}
