//! The target host as hostile ground: other local users may
//! write the target's directories. What a live path may resolve to through
//! symlinks, whose files may be kept as they are, and the ids the written
//! files get.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use certdeploy_core::{Role, StepError};
use globset::{GlobSet, GlobSetBuilder};
use openssh_sftp_client::metadata::MetaData;

use crate::error::{is_no_such_file, shell_quote};
use crate::host::{SshHost, p};
use crate::pool::Lease;

/// Most links followed while resolving one path (Linux's own limit).
const MAX_LINKS: usize = 40;

/// What a target's configuration says about the files on its host.
#[derive(Clone, Debug, Default)]
pub struct TargetPolicy {
    /// Globs (absolute paths) a symlinked live path may resolve to besides
    /// the configured path's own directory.
    pub link_targets: Vec<String>,
    /// Owner and group of the certificate and chain (names or numeric ids).
    pub cert_owner: Option<String>,
    pub cert_group: Option<String>,
    /// Owner and group of the key.
    pub key_owner: Option<String>,
    pub key_group: Option<String>,
}

impl TargetPolicy {
    /// The compiled `link_targets`; an invalid glob is a configuration error.
    pub fn link_globs(&self) -> Result<GlobSet, String> {
        let mut b = GlobSetBuilder::new();
        for g in &self.link_targets {
            let glob = globset::GlobBuilder::new(g)
                .literal_separator(true)
                .build()
                .map_err(|e| format!("link_targets: {g:?}: {e}"))?;
            b.add(glob);
        }
        b.build().map_err(|e| format!("link_targets: {e}"))
    }

    /// Owner and group names (or ids) configured for `role`: a file that
    /// holds the key (key, bundle, keystore) gets the key's.
    fn names(&self, role: Role) -> (Option<&str>, Option<&str>) {
        if role.holds_key() {
            (self.key_owner.as_deref(), self.key_group.as_deref())
        } else {
            (self.cert_owner.as_deref(), self.cert_group.as_deref())
        }
    }

    /// Whether `role`'s owner comes from the configuration (then the owner
    /// of an existing file does not matter: it is replaced).
    pub(crate) fn owner_configured(&self, role: Role) -> bool {
        self.names(role).0.is_some()
    }

    /// Whether any owner or group is configured.
    fn any_ids(&self) -> bool {
        [&self.cert_owner, &self.cert_group, &self.key_owner, &self.key_group].iter().any(|o| o.is_some())
    }
}

/// A name usable as a user or group: letters, digits, `._-` (and not
/// starting with `-`), or a numeric id.
pub fn valid_id_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && !s.starts_with('-')
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The ids the written files get, resolved on the host.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Ids {
    /// The uid the SFTP server runs as: the SSH user's, or under sudo the
    /// user sudo runs as ("the SSH user" of the rules for links and owners).
    pub ssh_uid: u32,
    /// Its primary group.
    pub ssh_gid: u32,
    pub cert: (Option<u32>, Option<u32>),
    pub key: (Option<u32>, Option<u32>),
}

impl Ids {
    /// The owner a file written for `role` gets: the configured ids, the
    /// rest from the existing file `kept` (checked by the snapshot) or the
    /// SSH user's. `None`: the SFTP server's default (the SSH user).
    pub(crate) fn owner_for(&self, role: Role, kept: Option<(Option<u32>, Option<u32>)>) -> Option<(u32, u32)> {
        let (cu, cg) = if role.holds_key() { self.key } else { self.cert };
        if cu.is_none() && cg.is_none() {
            return kept.and_then(|(u, g)| Some((u?, g?)));
        }
        let (ku, kg) = kept.unwrap_or((None, None));
        Some((cu.or(ku).unwrap_or(self.ssh_uid), cg.or(kg).unwrap_or(self.ssh_gid)))
    }

    /// Root or the SSH user: an owner whose files may be kept as they are
    /// and whose links may be followed.
    pub(crate) fn trusted(&self, uid: u32) -> bool {
        uid == 0 || uid == self.ssh_uid
    }
}

/// The uid and gid of the SFTP server per host account (and sudo
/// setting): asked once per process.
static SSH_UIDS: Mutex<Option<HashMap<String, (u32, u32)>>> = Mutex::new(None);

/// Most bytes of `/proc/self/status` read.
const STATUS_MAX: usize = 64 * 1024;

fn parent_of(path: &str) -> &str {
    match path.rfind('/') {
        Some(0) => "/",
        Some(i) => &path[..i],
        None => ".",
    }
}

fn join(dir: &str, name: &str) -> String {
    if dir.ends_with('/') { format!("{dir}{name}") } else { format!("{dir}/{name}") }
}

impl SshHost<'_> {
    /// Who the SFTP server runs as, in messages: the SSH user, or under sudo
    /// the user sudo runs as.
    pub(crate) fn acting_user(&self) -> &'static str {
        if self.addr().sudo.is_some() { "the user sudo runs as" } else { "the SSH user" }
    }

    /// The uid and gid the SFTP server runs as, read from its own
    /// `/proc/self/status` over SFTP (effective ids): under sudo that is the
    /// user sudo runs as (root unless sudoers says otherwise), which no
    /// command of the SSH user's could tell without a sudoers rule of its
    /// own.
    pub(crate) async fn server_ids(&self, lease: &Lease) -> Result<(u32, u32), StepError> {
        let path = "/proc/self/status";
        let fail = |why: String| {
            StepError::permanent(format!(
                "{}: cannot tell the uid the SFTP server runs as under sudo: {path}: {why}",
                self.addr()
            ))
        };
        let mut f = match lease.sftp().open(p(path)).await {
            Ok(f) => f,
            Err(e) => {
                let e = lease.sftp_err("open", path, &e);
                return Err(if e.is_transient() { e } else { fail(e.message) });
            }
        };
        let mut text = Vec::new();
        while text.len() < STATUS_MAX {
            match f.read(16 * 1024, Default::default()).await {
                Ok(Some(chunk)) => text.extend_from_slice(&chunk),
                Ok(None) => break,
                Err(e) => return Err(lease.sftp_err("read", path, &e)),
            }
        }
        let text = String::from_utf8_lossy(&text);
        // `Uid:\treal\teffective\tsaved\tfs`
        let effective = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|rest| rest.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u32>().ok())
        };
        match (effective("Uid:"), effective("Gid:")) {
            (Some(u), Some(g)) => Ok((u, g)),
            _ => Err(fail("no Uid:/Gid: lines".into())),
        }
    }

    /// The uid and gid the SFTP server runs as (the SSH user's, or under
    /// sudo those of the user sudo runs as) and the configured owners and
    /// groups, resolved on the host (`id -u`, `id -g`, `id -u NAME`,
    /// `getent group NAME`, as the SSH user, in one command; under sudo the
    /// server's own ids from [`Self::server_ids`]).
    pub(crate) async fn ids(&self, lease: &Lease) -> Result<Ids, StepError> {
        if let Some(ids) = *self.ids.lock().unwrap_or_else(|e| e.into_inner()) {
            return Ok(ids);
        }
        let addr = self.addr();
        let key = format!("{}@{addr} sudo={:?}", addr.user, addr.sudo);
        let cached = SSH_UIDS.lock().unwrap_or_else(|e| e.into_inner()).as_ref().and_then(|m| m.get(&key).copied());
        let pol = self.policy.clone();
        let names: Vec<(bool, &str)> = [
            (true, pol.cert_owner.as_deref()),
            (false, pol.cert_group.as_deref()),
            (true, pol.key_owner.as_deref()),
            (false, pol.key_group.as_deref()),
        ]
        .into_iter()
        .filter_map(|(user, n)| n.filter(|n| n.parse::<u32>().is_err()).map(|n| (user, n)))
        .collect();
        for (_, n) in &names {
            if !valid_id_name(n) {
                return Err(StepError::permanent(format!("{}: {n:?} is not a valid user or group name", self.addr())));
            }
        }
        let mut own = match (cached, &addr.sudo) {
            (Some(ids), _) => Some(ids),
            (None, Some(_)) => Some(self.server_ids(lease).await?),
            (None, None) => None,
        };
        let mut answers: HashMap<(bool, &str), u32> = HashMap::new();
        if own.is_none() || !names.is_empty() {
            let mut script = String::new();
            if own.is_none() {
                script.push_str("id -u && id -g\n");
            }
            for (user, n) in &names {
                let q = shell_quote(n);
                if *user {
                    script.push_str(&format!("id -u -- {q} 2>/dev/null || echo '?'\n"));
                } else {
                    script.push_str(&format!("getent group -- {q} 2>/dev/null | cut -d: -f3 | grep . || echo '?'\n"));
                }
            }
            let timeout = std::time::Duration::from_secs(30);
            let (code, out, _) = lease.exec(&script, timeout).await.map_err(|_| {
                StepError::transient(format!("{}: looking up user ids: connection lost or timed out", self.addr()))
            })?;
            let out = String::from_utf8_lossy(&out);
            let mut lines = out.lines().map(str::trim);
            if own.is_none() {
                let uid = lines.next().and_then(|l| l.parse::<u32>().ok()).filter(|_| code == Some(0));
                let gid = lines.next().and_then(|l| l.parse::<u32>().ok());
                let (Some(uid), Some(gid)) = (uid, gid) else {
                    return Err(StepError::permanent(format!(
                        "{}: `id -u` did not tell the SSH user's uid",
                        self.addr()
                    )));
                };
                own = Some((uid, gid));
            }
            for (user, n) in &names {
                match lines.next().and_then(|l| l.parse::<u32>().ok()) {
                    Some(id) => {
                        answers.insert((*user, n), id);
                    }
                    None => {
                        return Err(StepError::permanent(format!(
                            "{}: {} {n:?} does not exist on the host",
                            self.addr(),
                            if *user { "user" } else { "group" }
                        )));
                    }
                }
            }
        }
        let Some((ssh_uid, ssh_gid)) = own else {
            return Err(StepError::permanent(format!("{}: the SSH user's uid is unknown", self.addr())));
        };
        if cached.is_none() {
            SSH_UIDS
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get_or_insert_with(HashMap::new)
                .insert(key, (ssh_uid, ssh_gid));
        }
        let id = |user: bool, n: Option<&str>| -> Option<u32> {
            let n = n?;
            n.parse::<u32>().ok().or_else(|| answers.get(&(user, n)).copied())
        };
        let ids = Ids {
            ssh_uid,
            ssh_gid,
            cert: (id(true, pol.cert_owner.as_deref()), id(false, pol.cert_group.as_deref())),
            key: (id(true, pol.key_owner.as_deref()), id(false, pol.key_group.as_deref())),
        };
        *self.ids.lock().unwrap_or_else(|e| e.into_inner()) = Some(ids);
        Ok(ids)
    }

    /// The uid the SFTP server runs as, when this process already knows it
    /// (no request, no command).
    pub(crate) fn known_server_uid(&self) -> Option<u32> {
        if let Some(ids) = *self.ids.lock().unwrap_or_else(|e| e.into_inner()) {
            return Some(ids.ssh_uid);
        }
        let addr = self.addr();
        let key = format!("{}@{addr} sudo={:?}", addr.user, addr.sudo);
        SSH_UIDS.lock().unwrap_or_else(|e| e.into_inner()).as_ref().and_then(|m| m.get(&key)).map(|(u, _)| *u)
    }

    /// Whether the written files' ids must be looked up before writing.
    pub(crate) fn needs_ids(&self) -> bool {
        self.policy.any_ids()
    }

    /// Every link and owner rule a snapshot of `path` (configured for `role`)
    /// applies before anything is written: the links met resolving it
    /// ([`Self::resolve_checked`]), the owner of an existing regular file
    /// ([`Self::check_owner`]), and the configured owners and groups
    /// existing on the host. The path written and its metadata when it
    /// exists. Reads only: `certdeploy check` reports the same refusals.
    pub(crate) async fn path_rules(
        &self,
        lease: &Lease,
        role: Role,
        path: &str,
    ) -> Result<(String, Option<MetaData>), StepError> {
        let (live, known) = self.resolve_checked(lease, path).await?;
        if let Some(m) = &known
            && m.file_type().is_some_and(|t| t.is_file())
        {
            self.check_owner(lease, role, &live, m.uid()).await?;
        }
        if self.needs_ids() {
            self.ids(lease).await?;
        }
        Ok((live, known))
    }

    /// The owner check on an existing file at `live` (as
    /// configured for `role`): kept only if owned by root or the SSH user,
    /// unless the configuration names the owner.
    pub(crate) async fn check_owner(
        &self,
        lease: &Lease,
        role: Role,
        live: &str,
        uid: Option<u32>,
    ) -> Result<(), StepError> {
        if self.policy.owner_configured(role) {
            return Ok(());
        }
        let uid = uid.unwrap_or(u32::MAX);
        if uid == 0 {
            return Ok(());
        }
        let ids = self.ids(lease).await?;
        if ids.trusted(uid) {
            return Ok(());
        }
        Err(StepError::permanent(format!(
            "{}: {live} is owned by uid {uid}, neither root nor {} (uid {}); refusing to write it (it would stay theirs: set {}_owner to hand it to a chosen account)",
            self.addr(),
            self.acting_user(),
            ids.ssh_uid,
            if role.holds_key() { "key" } else { "cert" }
        )))
    }

    /// The path a deployment to `path` writes, with the link checks:
    /// every link met while resolving it (any component) belongs to root
    /// or the SSH user, and the final path lies in the directory of `path`
    /// (as configured or resolved) or matches `link_targets`. With the
    /// final path's metadata when it exists. One round trip when no
    /// component is a link.
    pub(crate) async fn resolve_checked(
        &self,
        lease: &Lease,
        path: &str,
    ) -> Result<(String, Option<MetaData>), StepError> {
        // Every prefix at once.
        let prefixes: Vec<String> = {
            let mut v = Vec::new();
            let mut cur = String::new();
            for c in path.split('/').filter(|c| !c.is_empty()) {
                cur.push('/');
                cur.push_str(c);
                v.push(cur.clone());
            }
            v
        };
        let stats = crate::host::in_order_all(prefixes.iter().map(|pre| {
            let mut fs = lease.sftp().fs();
            async move { fs.symlink_metadata(p(pre)).await }
        }))
        .await;
        let mut any_link = false;
        for (pre, st) in prefixes.iter().zip(&stats) {
            match st {
                Ok(m) if m.file_type().is_some_and(|t| t.is_symlink()) => {
                    any_link = true;
                    break;
                }
                Ok(_) => {}
                Err(e) if is_no_such_file(e) => break,
                Err(e) => return Err(lease.sftp_err("stat", pre, e)),
            }
        }
        if !any_link {
            let last = match stats.into_iter().last() {
                Some(Ok(m)) => Some(m),
                _ => None,
            };
            return Ok((path.to_string(), last));
        }
        let dir = parent_of(path);
        let (dir_res, _) = self.walk(lease, path, dir).await?;
        let (live, meta) = self.walk(lease, path, &join(&dir_res, crate::host::file_name(path))).await?;
        let final_dir = parent_of(&live);
        if final_dir == dir || final_dir == dir_res {
            return Ok((live, meta));
        }
        let globs = self.policy.link_globs().map_err(|e| StepError::permanent(format!("{}: {e}", self.addr())))?;
        if globs.is_match(&live) {
            return Ok((live, meta));
        }
        Err(StepError::permanent(format!(
            "{}: {path} is a symlink resolving to {live}, outside {dir} and not matched by the target's link_targets; refusing to follow it",
            self.addr()
        )))
    }

    /// Resolve `path` component by component (`shown`: the configured path,
    /// for messages), refusing links owned by anyone but root or the SSH
    /// user.
    async fn walk(&self, lease: &Lease, shown: &str, path: &str) -> Result<(String, Option<MetaData>), StepError> {
        let mut todo: VecDeque<String> =
            path.split('/').filter(|c| !c.is_empty() && *c != ".").map(String::from).collect();
        let mut done = String::from("/");
        let mut links = 0;
        let mut last_meta = None;
        let mut fs = lease.sftp().fs();
        while let Some(c) = todo.pop_front() {
            if c == ".." {
                done = parent_of(&done).to_string();
                continue;
            }
            let cand = join(&done, &c);
            let m = match fs.symlink_metadata(p(&cand)).await {
                Ok(m) => m,
                Err(e) if is_no_such_file(&e) => {
                    // The rest does not exist: the path is what it names.
                    let mut rest = cand;
                    for c in todo {
                        rest = join(&rest, &c);
                    }
                    return Ok((rest, None));
                }
                Err(e) => return Err(lease.sftp_err("stat", &cand, &e)),
            };
            if m.file_type().is_some_and(|t| t.is_symlink()) {
                links += 1;
                if links > MAX_LINKS {
                    return Err(StepError::permanent(format!(
                        "{}: {shown}: more than {MAX_LINKS} symlinks while resolving it",
                        self.addr()
                    )));
                }
                let uid = m.uid().unwrap_or(u32::MAX);
                if uid != 0 {
                    let ids = self.ids(lease).await?;
                    if !ids.trusted(uid) {
                        return Err(StepError::permanent(format!(
                            "{}: {shown}: the symlink {cand} is owned by uid {uid}, neither root nor {} (uid {}); refusing to follow it",
                            self.addr(),
                            self.acting_user(),
                            ids.ssh_uid
                        )));
                    }
                }
                let target = match fs.read_link(p(&cand)).await {
                    Ok(t) => t,
                    Err(e) => return Err(lease.sftp_err("read symlink", &cand, &e)),
                };
                let Some(target) = target.to_str() else {
                    return Err(StepError::permanent(format!("{}: {cand}: link target is not UTF-8", self.addr())));
                };
                if target.starts_with('/') {
                    done = String::from("/");
                }
                for c in target.split('/').filter(|c| !c.is_empty() && *c != ".").rev() {
                    todo.push_front(c.to_string());
                }
                last_meta = None;
                continue;
            }
            done = cand;
            last_meta = Some(m);
        }
        Ok((done, last_meta))
    }
}
