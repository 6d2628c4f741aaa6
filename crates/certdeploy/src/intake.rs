//! The trust boundary: everything a request must pass before any host is
//! contacted. Each refusal names the field and the problem.

use certdeploy_core::wire::{DeployRequest, RequestError, decode_request, printable};
use certdeploy_core::{
    CertificateInfo, Digest, ExtraFile, Formats, Keystore, Material, MaterialFacts, Payload, Plan, PlanError, Policy,
    Secret, TargetSpec, Timestamp, build_plan_with, check_target_paths, parse_mode, target_paths,
};

use crate::config::{Config, TargetConfig, check_endpoint, check_host, glob_match, path_glob_match};

/// Clock skew tolerated on a certificate's notBefore.
pub const NOT_BEFORE_SKEW_S: i64 = 300;

/// A request that passed every check; ready to plan an attempt. It holds
/// everything a plan is built from, as the configuration was when the
/// request was checked: a reload after that changes none of its attempts.
#[derive(Debug)]
pub struct Validated {
    pub deployment_id: String,
    pub target_name: String,
    pub spec: TargetSpec,
    pub target_config: Option<TargetConfig>,
    /// Timeouts, budgets and per-target policy.
    pub policy: Policy,
    pub material: Material,
    pub facts: MaterialFacts,
    /// Subject and notAfter of the leaf, journaled with the plan.
    pub certificate: CertificateInfo,
    /// The configured target's extra files (bundle, keystore built for
    /// this request): every attempt writes the same keystore.
    pub formats: Formats,
    /// Read and compare only (`"dry_run": true`): never journaled.
    pub dry_run: bool,
}

/// Why a request is refused, with what could be salvaged for the result.
#[derive(Debug)]
pub struct Rejection {
    pub deployment_id: Option<String>,
    pub target: Option<String>,
    pub error: RequestError,
}

impl Validated {
    pub fn plan(&self, attempt: u32) -> Result<(Plan, Payload), RequestError> {
        let (mut plan, payload) = build_plan_with(
            &self.deployment_id,
            &self.target_name,
            &self.spec,
            &self.material,
            &self.facts,
            self.policy.clone(),
            attempt,
            &self.formats,
        )
        .map_err(|PlanError::Target { field, problem }| {
            if self.target_config.is_some() {
                RequestError::new("target", format!("target {}: {field}: {problem}", self.target_name))
            } else {
                RequestError::new(format!("target_spec.{field}"), problem)
            }
        })?;
        plan.certificate = Some(self.certificate.clone());
        Ok((plan, payload))
    }
}

/// Decode and check a message body from the bus: the request checks plus
/// the bus-only rules (sealed keys required, request age).
pub fn validate_body(body: &[u8], cfg: &Config, now: Timestamp) -> Result<Validated, Rejection> {
    let req = decode_request(body).map_err(|error| {
        let (id, target) = certdeploy_core::wire::salvage_ids(body);
        Rejection { deployment_id: id, target, error }
    })?;
    let id = req.deployment_id.clone();
    let target = req.target.clone().or_else(|| req.target_spec.as_ref().map(|_| "inline".to_string()));
    let reject = |error| Rejection { deployment_id: Some(id.clone()), target: target.clone(), error };
    if cfg.worker.require_sealed_keys && req.private_key_pem.is_some() {
        return Err(reject(RequestError::new(
            "private_key_pem",
            "keys must be sealed for this worker (require_sealed_keys = true): send `private_key_age`",
        )));
    }
    check_age(req.requested_at.as_deref(), cfg.worker.max_request_age_s, now).map_err(reject)?;
    validate_request(req, cfg, now).map_err(reject)
}

/// `max_request_age_s`: a request older than that when it arrives is stale.
fn check_age(requested_at: Option<&str>, max_age_s: u64, now: Timestamp) -> Result<(), RequestError> {
    if max_age_s == 0 {
        return Ok(());
    }
    let Some(at) = requested_at else {
        return Err(RequestError::new(
            "requested_at",
            format!("missing: this worker rejects requests older than {max_age_s} s"),
        ));
    };
    let t = humantime::parse_rfc3339_weak(at).map_err(|_| {
        RequestError::new(
            "requested_at",
            format!("`{}` is not an RFC 3339 UTC time like 2026-11-27T21:00:00Z", printable(at)),
        )
    })?;
    let at_ms = t.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    let age_s = now.0.saturating_sub(at_ms) / 1000;
    if age_s > max_age_s {
        return Err(RequestError::new(
            "requested_at",
            format!("stale: requested {age_s} s ago, this worker accepts requests up to {max_age_s} s old"),
        ));
    }
    Ok(())
}

/// Check a decoded request against the configuration and the PKI rules.
pub fn validate_request(req: DeployRequest, cfg: &Config, now: Timestamp) -> Result<Validated, RequestError> {
    let (target_name, spec, target_config) = match (&req.target, &req.target_spec) {
        (Some(name), None) => match cfg.targets.get(name) {
            Some(t) => (name.clone(), t.spec(), Some(t.clone())),
            None => {
                return Err(RequestError::new(
                    "target",
                    format!("unknown target `{}` (not in the worker configuration)", printable(name)),
                ));
            }
        },
        (None, Some(spec)) => {
            check_inline(spec, cfg)?;
            ("inline".to_string(), spec.clone(), None)
        }
        _ => return Err(RequestError::new("target", "give exactly one of `target` and `target_spec`")),
    };
    let key: Secret = match (&req.private_key_pem, &req.private_key_age) {
        (Some(pem), None) => Secret::new(pem.expose_str().as_bytes().to_vec()),
        (None, Some(sealed)) => {
            cfg.keyring.open(sealed).map_err(|e| RequestError::new(crate::sealed::AGE_FIELD, e.to_string()))?
        }
        _ => {
            return Err(RequestError::new(
                "private_key_pem",
                "give exactly one of `private_key_pem` and `private_key_age`",
            ));
        }
    };
    let key_text = std::str::from_utf8(key.expose())
        .map_err(|_| RequestError::new(crate::sealed::AGE_FIELD, "its plaintext is not text (a PEM key is)"))?;
    let now_s = (now.0 / 1000) as i64;
    let facts = certdeploy_pki::validate_bundle(
        &req.certificate_pem,
        key_text,
        req.chain_pem.as_deref(),
        now_s,
        NOT_BEFORE_SKEW_S,
    )
    .map_err(|e| {
        // A problem of a sealed key is reported under the field it came in.
        let field = match e.field {
            "private_key_pem" if req.private_key_age.is_some() => crate::sealed::AGE_FIELD,
            f => f,
        };
        RequestError::new(field, e.problem)
    })?;
    if let Some(t) = &target_config {
        check_server_names(&t.server_names, &facts.dns_names, &target_name)?;
    }
    let formats = match &target_config {
        Some(t) => formats(t, &req.certificate_pem, key_text, req.chain_pem.as_deref())?,
        None => Formats::default(),
    };
    let material = Material { certificate_pem: req.certificate_pem, private_key_pem: key, chain_pem: req.chain_pem };
    let v = Validated {
        formats,
        deployment_id: req.deployment_id,
        target_name,
        spec,
        policy: cfg.policy(target_config.as_ref()),
        target_config,
        material,
        facts: MaterialFacts { leaf_sha256: Some(Digest(facts.leaf_sha256)), not_before: Some(facts.not_before) },
        certificate: CertificateInfo { subject: facts.subject, not_after: facts.not_after },
        dry_run: req.dry_run,
    };
    // A request whose plan cannot be built is rejected here, never handed
    // to the runtime (which would return it to the queue, again and again).
    // The plan depends on the attempt number only in that field.
    v.plan(1).map(drop)?;
    Ok(v)
}

/// The certificate must cover every name the target serves: in a batch of
/// thousands this is what stops a certificate from landing on the wrong
/// service (rejected before any host is contacted).
fn check_server_names(wanted: &[String], dns_names: &[String], target: &str) -> Result<(), RequestError> {
    let missing: Vec<&str> =
        wanted.iter().filter(|n| !certdeploy_pki::names_cover(dns_names, n)).map(String::as_str).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let has = match dns_names {
        [] => "no DNS names".to_string(),
        names => names.iter().map(|n| printable(n)).collect::<Vec<_>>().join(", "),
    };
    Err(RequestError::new(
        "certificate_pem",
        format!(
            "does not cover {} of target `{target}`'s server_names ({}); the certificate names {has}",
            missing.len(),
            missing.join(", ")
        ),
    ))
}

/// A configured target's extra files for this request's material: the
/// bundle's place, and the keystore built under the configured alias and
/// password.
fn formats(t: &TargetConfig, cert: &str, key: &str, chain: Option<&str>) -> Result<Formats, RequestError> {
    let bundle = t.bundle_path.as_ref().map(|path| ExtraFile { path: path.clone(), mode: t.bundle_mode.clone() });
    let pkcs12 = match (&t.pkcs12_path, &t.pkcs12_password) {
        (Some(path), Some(password)) => {
            let text = std::str::from_utf8(password.expose()).unwrap_or("");
            let ks = certdeploy_pki::pkcs12_keystore(cert, key, chain, &t.pkcs12_alias, text)
                .map_err(|e| RequestError::new(e.field, e.problem))?;
            let keystore = Keystore {
                bytes: Secret::new(ks.bytes.to_vec()),
                holds: Digest(ks.holds),
                password: password.clone(),
                open: open_keystore,
            };
            Some((ExtraFile { path: path.clone(), mode: t.pkcs12_mode.clone() }, keystore))
        }
        _ => None,
    };
    Ok(Formats { bundle, pkcs12 })
}

/// [`certdeploy_core::OpenKeystore`]: what a keystore found on a host holds.
fn open_keystore(bytes: &[u8], password: &Secret) -> Option<Digest> {
    let password = std::str::from_utf8(password.expose()).ok()?;
    certdeploy_pki::keystore_holds(bytes, password).map(Digest)
}

/// Inline targets: whoever can publish must not gain command execution or
/// reach arbitrary hosts.
fn check_inline(spec: &TargetSpec, cfg: &Config) -> Result<(), RequestError> {
    let w = &cfg.worker;
    if !w.allow_inline_targets {
        return Err(RequestError::new(
            "target_spec",
            "inline targets are disabled on this worker (allow_inline_targets = false)",
        ));
    }
    let field = |k: &str| format!("target_spec.{k}");
    check_host(&spec.host).map_err(|p| RequestError::new(field("host"), p))?;
    if !w.inline_host_allowlist.iter().any(|g| glob_match(g, &spec.host)) {
        return Err(RequestError::new(
            field("host"),
            format!("`{}` is not in inline_host_allowlist", printable(&spec.host)),
        ));
    }
    if spec.user.is_empty()
        || spec.user.starts_with('-')
        || !spec.user.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
    {
        return Err(RequestError::new(field("user"), "must be a plain user name"));
    }
    for (k, p) in target_paths(spec) {
        if let Err(e) = certdeploy_core::check_target_path(p) {
            return Err(RequestError::new(field(k), format!("`{}` {e}", printable(p))));
        }
        // Otherwise a publisher could overwrite any file the SSH user may
        // write (e.g. ~/.ssh/authorized_keys) with PEM content.
        if !w.inline_path_allowlist.iter().any(|g| path_glob_match(g, p)) {
            return Err(RequestError::new(field(k), format!("`{}` is not in inline_path_allowlist", printable(p))));
        }
        // A configured target's file (or one of its backups) is not an
        // inline target's to take.
        if let Some((name, f)) = cfg.target_using_path(&spec.host, spec.port, p) {
            return Err(RequestError::new(
                field(k),
                format!(
                    "`{}` is also configured target {name}'s {f} on the same host: an inline target must not share \
                     a path with a configured one",
                    printable(p)
                ),
            ));
        }
    }
    check_target_paths(spec).map_err(|PlanError::Target { field: f, problem }| RequestError::new(field(f), problem))?;
    if spec.port == 0 {
        return Err(RequestError::new(field("port"), "must be from 1 to 65535"));
    }
    for (k, m) in [("cert_mode", &spec.cert_mode), ("key_mode", &spec.key_mode)] {
        match parse_mode(m) {
            None => {
                return Err(RequestError::new(field(k), format!("`{}` is not an octal mode like 0644", printable(m))));
            }
            // A publisher must not be able to expose the key (or let others
            // replace the certificate) on the host.
            Some(mode) if k == "key_mode" && mode & 0o007 != 0 => {
                return Err(RequestError::new(
                    field(k),
                    format!("`{}` gives other users access to the private key", printable(m)),
                ));
            }
            Some(mode) if mode & 0o002 != 0 => {
                return Err(RequestError::new(field(k), format!("`{}` is world-writable", printable(m))));
            }
            Some(_) => {}
        }
    }
    for (k, c) in [("reload_command", Some(&spec.reload_command)), ("validate_command", spec.validate_command.as_ref())]
    {
        if let Some(c) = c
            && !w.inline_command_allowlist.iter().any(|a| a == c)
        {
            return Err(RequestError::new(field(k), format!("`{}` is not in inline_command_allowlist", printable(c))));
        }
    }
    if let Some(ep) = &spec.verify_endpoint {
        check_endpoint(ep).map_err(|p| RequestError::new(field("verify_endpoint"), p))?;
        let host = ep.rsplit_once(':').map(|(h, _)| h).unwrap_or(ep);
        if !w.inline_host_allowlist.iter().any(|g| glob_match(g, host)) {
            return Err(RequestError::new(
                field("verify_endpoint"),
                format!("`{}` is not in inline_host_allowlist", printable(host)),
            ));
        }
    }
    if let Some(sni) = &spec.verify_sni {
        check_host(sni).map_err(|p| RequestError::new(field("verify_sni"), p))?;
    }
    Ok(())
}

/// A checked group request: its fan-out fixed, each member's request
/// checked (as the child `<deployment_id>:<target>`), and the request as
/// the worker keeps it until every member ran (no key in clear).
pub struct GroupValidated {
    pub spec: certdeploy_core::group::GroupSpec,
    pub members: Vec<Validated>,
    pub kept: String,
}

/// Decode and check a group request (`"group": "NAME"`): the bus rules,
/// the group, and every member's request as its child's. Any member
/// refused refuses the whole group before any host is contacted.
pub fn validate_group_body(body: &[u8], cfg: &Config, now: Timestamp) -> Result<GroupValidated, Rejection> {
    let group_name = certdeploy_core::wire::salvage_group(body);
    let req = decode_request(body).map_err(|error| {
        let (id, _) = certdeploy_core::wire::salvage_ids(body);
        Rejection { deployment_id: id, target: group_name.clone(), error }
    })?;
    let reject = |error| Rejection {
        deployment_id: Some(req.deployment_id.clone()),
        target: req.group.clone().or_else(|| group_name.clone()),
        error,
    };
    let Some(name) = req.group.clone() else {
        return Err(reject(RequestError::new("group", "missing")));
    };
    if cfg.worker.require_sealed_keys && req.private_key_pem.is_some() {
        return Err(reject(RequestError::new(
            "private_key_pem",
            "keys must be sealed for this worker (require_sealed_keys = true): send `private_key_age`",
        )));
    }
    check_age(req.requested_at.as_deref(), cfg.worker.max_request_age_s, now).map_err(reject)?;
    if req.dry_run {
        return Err(reject(RequestError::new("dry_run", "a group request cannot be a dry run: dry-run each target")));
    }
    let Some(g) = cfg.groups.get(&name) else {
        return Err(reject(RequestError::new(
            "group",
            format!("unknown group `{}` (not in the worker configuration)", printable(&name)),
        )));
    };
    // The worker keeps the request until the last member ran (across
    // restarts): sealed to its own first identity, never in clear.
    let Some(recipient) = cfg.keyring.first_recipient() else {
        return Err(reject(RequestError::new(
            "group",
            "this worker has no key_identities: a group request is kept (sealed to the worker) until every member \
             ran, so the worker needs an identity to seal it to",
        )));
    };
    let kept = match crate::sealed::seal_body(body, &recipient) {
        Some(Ok(sealed)) => sealed,
        Some(Err(e)) => return Err(reject(RequestError::new("private_key_pem", format!("cannot be sealed: {e}")))),
        None => body.to_vec(),
    };
    let kept = String::from_utf8(kept).map_err(|_| reject(RequestError::new("body", "not valid UTF-8")))?;
    let spec = certdeploy_core::group::GroupSpec {
        group_id: req.deployment_id.clone(),
        group: name.clone(),
        members: g.targets.clone(),
        waves: certdeploy_core::group::cumulative_waves(&g.wave_sizes(), g.targets.len()),
        max_failed: g.max_failed,
        on_failure: g.on_failure,
    };
    let mut members = Vec::with_capacity(spec.members.len());
    for m in &spec.members {
        members.push(validate_member(&req, &spec, m, cfg, now).map_err(reject)?);
    }
    Ok(GroupValidated { spec, members, kept })
}

/// One member's request: the group request as the child's, to the member's
/// target. A refusal names the member.
fn validate_member(
    req: &DeployRequest,
    spec: &certdeploy_core::group::GroupSpec,
    member: &str,
    cfg: &Config,
    now: Timestamp,
) -> Result<Validated, RequestError> {
    let mut child = req.clone();
    child.group = None;
    child.target = Some(member.to_string());
    child.deployment_id = spec.child_id(member);
    validate_request(child, cfg, now)
        .map_err(|e| RequestError::new(e.field, format!("member {}: {}", printable(member), e.problem)))
}

/// The members' requests again, from the kept request (after a restart):
/// per member, its checked request or why it cannot run now (a target
/// removed from the configuration since, a key no identity opens).
pub fn group_members(
    kept: &str,
    spec: &certdeploy_core::group::GroupSpec,
    cfg: &Config,
    now: Timestamp,
) -> Vec<Result<Validated, RequestError>> {
    match decode_request(kept.as_bytes()) {
        Ok(req) => spec.members.iter().map(|m| validate_member(&req, spec, m, cfg, now)).collect(),
        Err(e) => spec.members.iter().map(|_| Err(e.clone())).collect(),
    }
}
