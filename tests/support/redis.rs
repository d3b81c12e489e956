//! A redis-server of the test's own.

use std::time::Duration;

/// A redis-server of the test's own on a free port, so a test can stop it
/// (to check behaviour with Redis down) without touching anyone else's.
pub struct RedisServer {
    pub port: u16,
    child: Option<std::process::Child>,
}

impl RedisServer {
    pub async fn start() -> RedisServer {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        Self::start_on(port).await
    }

    /// Starts it again on the same port (empty: nothing is persisted).
    pub async fn restart(&mut self) {
        self.stop();
        let fresh = Self::start_on(self.port).await;
        *self = fresh;
    }

    async fn start_on(port: u16) -> RedisServer {
        let mut child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("redis-server (make test installs it)");
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return RedisServer {
                    port,
                    child: Some(child),
                };
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("redis-server did not start on port {port}");
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server: everything after this sees Redis down.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A three-node Redis cluster of the test's own (no replicas), made with
/// `redis-cli --cluster create`: what ElastiCache Serverless and other
/// cluster-mode Redis look like to a client (MOVED, slots per node).
pub struct RedisCluster {
    pub ports: Vec<u16>,
    children: Vec<std::process::Child>,
    _dir: std::path::PathBuf,
}

impl RedisCluster {
    pub async fn start() -> RedisCluster {
        let dir =
            std::env::temp_dir().join(format!("redis-cluster-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        // A port picked here can be taken by another test's server before
        // ours binds it: then those nodes are started again elsewhere.
        let (ports, children) = 'nodes: {
            for _ in 0..5 {
                if let Some(up) = Self::start_nodes(&dir).await {
                    break 'nodes up;
                }
            }
            panic!("three cluster nodes did not start on free ports");
        };
        let nodes: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let out = std::process::Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&nodes)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        // Until every node agrees the cluster is up.
        for _ in 0..200 {
            let ok = ports.iter().all(|p| {
                std::process::Command::new("redis-cli")
                    .args(["-p", &p.to_string(), "cluster", "info"])
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stdout).contains("cluster_state:ok"))
                    .unwrap_or(false)
            });
            if ok {
                return RedisCluster {
                    ports,
                    children,
                    _dir: dir,
                };
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the cluster did not come up");
    }

    /// Three cluster-enabled nodes on ports of their own, each answering
    /// as ours; `None` (all stopped) when one is not.
    async fn start_nodes(dir: &std::path::Path) -> Option<(Vec<u16>, Vec<std::process::Child>)> {
        // Held together while picking, so the three ports differ.
        let listeners: Vec<std::net::TcpListener> = (0..3)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        let ports: Vec<u16> = listeners
            .iter()
            .map(|l| l.local_addr().unwrap().port())
            .collect();
        drop(listeners);
        let mut children = Vec::new();
        for p in &ports {
            let child = std::process::Command::new("redis-server")
                .current_dir(dir)
                .args([
                    "--port",
                    &p.to_string(),
                    "--bind",
                    "127.0.0.1",
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    &format!("nodes-{p}.conf"),
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("redis-server");
            children.push(child);
        }
        let cluster_node = |p: u16| {
            std::process::Command::new("redis-cli")
                .args(["-p", &p.to_string(), "info", "cluster"])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).contains("cluster_enabled:1"))
                .unwrap_or(false)
        };
        let mut up = true;
        for (p, child) in ports.iter().zip(children.iter_mut()) {
            let mut ours = false;
            for _ in 0..100 {
                if !matches!(child.try_wait(), Ok(None)) {
                    break; // it exited: the port was taken
                }
                if cluster_node(*p) {
                    ours = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            up &= ours;
        }
        if up {
            return Some((ports, children));
        }
        for c in &mut children {
            let _ = c.kill();
            let _ = c.wait();
        }
        None
    }

    /// One node's address: a cluster client finds the others from it.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.ports[0])
    }

    /// How many keys each node holds.
    pub fn keys_per_node(&self) -> Vec<u64> {
        self.ports
            .iter()
            .map(|p| {
                std::process::Command::new("redis-cli")
                    .args(["-p", &p.to_string(), "dbsize"])
                    .output()
                    .ok()
                    .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
                    .unwrap_or(0)
            })
            .collect()
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self._dir);
    }
}
