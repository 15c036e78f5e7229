//! Test certificates, made by `scripts/make-test-certs.sh` (which needs openssl; CI
//! installs it). The layout is the script's: `source/`, `destination/`, `other-ca/`
//! (trusts the Ferry CA, but its own certificate was signed by another CA) and `qemu/`.

use std::path::{Path, PathBuf};

/// A directory of test certificates, removed on drop.
pub struct Certs {
    dir: PathBuf,
}

impl Certs {
    /// Makes a fresh set; panics with the reason when the script fails.
    pub fn make() -> Certs {
        let dir = std::env::temp_dir().join(format!(
            "ferry-certs-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        if let Err(e) = make_in(&dir) {
            panic!("{e}");
        }
        Certs { dir }
    }

    /// The source's TLS directory.
    pub fn source(&self) -> PathBuf {
        self.dir.join("source")
    }

    /// The destination's TLS directory.
    pub fn destination(&self) -> PathBuf {
        self.dir.join("destination")
    }

    /// A TLS directory whose certificate another CA signed.
    pub fn other_ca(&self) -> PathBuf {
        self.dir.join("other-ca")
    }

    /// QEMU's `tls-creds-x509` directory.
    pub fn qemu(&self) -> PathBuf {
        self.dir.join("qemu")
    }
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs `scripts/make-test-certs.sh OUT` (its layout, under `out`); the error says why
/// it failed (openssl missing, say).
pub fn make_in(out: &Path) -> Result<(), String> {
    let run = std::process::Command::new("bash")
        .arg(script())
        .arg(out)
        .output()
        .map_err(|e| format!("running bash for scripts/make-test-certs.sh: {e}"))?;
    if run.status.success() {
        return Ok(());
    }
    Err(format!(
        "scripts/make-test-certs.sh failed (is openssl installed? apt-get install openssl): {}",
        String::from_utf8_lossy(&run.stderr).trim()
    ))
}

/// The script, found from this crate's source directory.
pub fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/make-test-certs.sh")
}
