//! What the scenario tests against the in-memory host share: the paths and
//! reload command of `testkit::test_plan`'s target, the certificates they
//! start from, and a host that runs that reload and serves that cert.
#![allow(dead_code)]

use certdeploy_core::testkit::{Rig, Sim};

pub const RELOAD: &str = "systemctl reload nginx";
pub const CERT: &str = "/etc/ssl/site.pem";
pub const KEY: &str = "/etc/ssl/site.key";
pub const CHAIN: &str = "/etc/ssl/chain.pem";

pub const OLD_CERT: &[u8] = b"CERT old nb=100\nold-body\n";
pub const OLD_KEY: &[u8] = b"OLD KEY\n";
pub const NEW_CERT: &[u8] = b"CERT new nb=200\nnew-body\n";

/// A simulated host whose daemon reloads with [`RELOAD`] and serves the
/// certificate at [`CERT`].
pub fn rig() -> Rig {
    let sim = Sim::new();
    {
        let mut w = sim.world();
        w.reload_commands.insert(RELOAD.to_string());
        w.served_path = Some(CERT.to_string());
    }
    Rig::new(sim)
}
