//! HAProxy (Debian's package) as the reference balancer some tests compare
//! pglb with: a generated config run in the foreground, killed on drop.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

/// A running HAProxy.
pub struct Haproxy {
    child: Child,
    dir: PathBuf,
}

impl Haproxy {
    /// `None` (after [`crate::skip`]) when HAProxy is not installed.
    pub fn start(config: &str) -> Option<Self> {
        let bin = ["/usr/sbin/haproxy", "/usr/bin/haproxy"].into_iter().map(PathBuf::from).find(|p| p.exists());
        let Some(bin) = bin else {
            crate::skip("haproxy is not installed (Debian package haproxy)");
            return None;
        };
        let dir = std::env::temp_dir().join(format!(
            "pglb-haproxy-{}-{}",
            std::process::id(),
            pglb_cluster::free_port().expect("port")
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let file = dir.join("haproxy.cfg");
        std::fs::write(&file, config).expect("write haproxy.cfg");
        let check = Command::new(&bin).arg("-c").arg("-q").arg("-f").arg(&file).output().expect("run haproxy -c");
        assert!(check.status.success(), "haproxy -c: {}", String::from_utf8_lossy(&check.stderr));
        let log = std::fs::File::create(dir.join("haproxy.log")).expect("log");
        let child = Command::new(&bin)
            .arg("-f")
            .arg(&file)
            .arg("-db")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn haproxy");
        Some(Self { child, dir })
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
