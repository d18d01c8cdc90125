//! The checks of a HotPrefixService that its schema cannot express: Kubernetes quantities,
//! names, URL shapes, secrets kept out of URLs, chat templates that do not compile, and
//! cross-field rules. A spec failing one is
//! never applied; the controller reports the [`SpecError`] in the `Degraded` condition
//! (reason `InvalidSpec`) and waits for the next change, so a bad spec cannot crash-loop
//! anything.

use k8s_openapi::api::core::v1::{EnvVar, ResourceRequirements};

use crate::crd::{
    Backend, EngineSpec, ExternalRedis, HotPrefixService, MAX_CHAT_TEMPLATE_LEN, MAX_NAME_LEN,
    ManagedRedis, ModelSource, RedisSpec, RouterSpec, SecretKeyRef, UrlSource,
};
use crate::quantity;

/// A field of the spec that is invalid, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct SpecError {
    /// The field's path, as in the object (`spec.engine.cache.blockSize`).
    pub field: String,
    /// What is wrong, in a sentence the user can act on.
    pub message: String,
}

fn err<T>(field: &str, message: impl Into<String>) -> Result<T, SpecError> {
    Err(SpecError {
        field: field.to_string(),
        message: message.into(),
    })
}

/// Whether `s` is an RFC 1035 label (a Service name): at most 63 lowercase letters, digits and
/// '-', starting with a letter and ending with a letter or digit.
pub fn is_dns1035_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_lowercase()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b.last() != Some(&b'-')
}

/// Whether `s` is an RFC 1123 subdomain (the name of most objects): dot-separated labels of
/// lowercase letters, digits and '-', at most 253 characters.
pub fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253
        && !s.is_empty()
        && s.split('.').all(|l| {
            let b = l.as_bytes();
            !b.is_empty()
                && b.len() <= 63
                && b.iter()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
                && b[0] != b'-'
                && b[b.len() - 1] != b'-'
        })
}

/// Whether `s` is a usable environment variable name (Kubernetes' rule: letters, digits,
/// '_', '-', '.', not starting with a digit).
fn is_env_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && !b[0].is_ascii_digit()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b'.'))
}

/// Checks everything about `hps` that its schema does not; the builders rely on it.
pub fn validate(hps: &HotPrefixService) -> Result<(), SpecError> {
    let name = hps.metadata.name.as_deref().unwrap_or_default();
    if !is_dns1035_label(name) || name.len() > MAX_NAME_LEN {
        return err(
            "metadata.name",
            format!(
                "{name:?} must be a DNS label of at most {MAX_NAME_LEN} characters starting \
                 with a letter (the engine pods, Services and Redis keys derive their names \
                 from it)"
            ),
        );
    }
    // The endpoint Service is named like the service and the other children add these
    // suffixes: `a-engine`'s endpoint would be `a`'s engine Service.
    if let Some(suffix) = ["-engine", "-router", "-redis"]
        .into_iter()
        .find(|s| name.ends_with(s))
    {
        return err(
            "metadata.name",
            format!("{name:?} must not end in {suffix}: another service's children use it"),
        );
    }
    let spec = &hps.spec;
    if let Some(n) = &spec.model.name
        && (n.trim().is_empty() || n.len() > 256 || n.chars().any(char::is_control))
    {
        return err("spec.model.name", "must be 1 to 256 printable characters");
    }
    model_source(&spec.model.source)?;
    if let Some(t) = &spec.model.chat_template {
        chat_template(t)?;
    }
    engine(&spec.engine)?;
    router(&spec.router)?;
    match &spec.redis {
        RedisSpec::Managed(m) => managed_redis(m)?,
        RedisSpec::External(e) => external_redis(e)?,
    }
    if let Some(e) = &spec.otlp_endpoint {
        http_url("spec.otlpEndpoint", e, false)?;
    }
    Ok(())
}

/// A chat template the engines and the router will accept: what their `--chat-template` check
/// refuses (a blank template, one that does not compile) would stop every pod at start-up, so
/// it is refused here, by the same template engine (`minijinja`, the workspace's version and
/// features), before anything is applied.
fn chat_template(t: &str) -> Result<(), SpecError> {
    let field = "spec.model.chatTemplate";
    if t.trim().is_empty() {
        return err(
            field,
            "must not be blank: give a template, or leave the field out for the model's own",
        );
    }
    let chars = t.chars().count();
    if chars > MAX_CHAT_TEMPLATE_LEN {
        return err(
            field,
            format!("{chars} characters; at most {MAX_CHAT_TEMPLATE_LEN}"),
        );
    }
    let mut env = minijinja::Environment::new();
    if let Err(e) = env.add_template("chat_template", t) {
        return err(field, format!("does not compile as a Jinja template: {e}"));
    }
    Ok(())
}

fn model_source(source: &ModelSource) -> Result<(), SpecError> {
    match source {
        ModelSource::Pvc(p) => {
            if !is_dns_subdomain(&p.claim_name) {
                return err(
                    "spec.model.source.pvc.claimName",
                    format!("{:?} is not a PersistentVolumeClaim name", p.claim_name),
                );
            }
            relative_path("spec.model.source.pvc.path", &p.path)
        }
        ModelSource::HostPath(h) => {
            let f = "spec.model.source.hostPath.path";
            if !h.path.starts_with('/') || h.path == "/" {
                return err(f, format!("{:?} must be an absolute path below /", h.path));
            }
            if h.path.split('/').any(|c| c == ".." || c == ".") {
                return err(
                    f,
                    format!("{:?} must not contain . or .. components", h.path),
                );
            }
            Ok(())
        }
        ModelSource::Url(u) => url_source(u),
        ModelSource::Random(_) => Ok(()),
    }
}

fn relative_path(field: &str, p: &str) -> Result<(), SpecError> {
    if p.is_empty() || p.starts_with('/') {
        return err(
            field,
            format!("{p:?} must be a path relative to the claim's root"),
        );
    }
    if p.split('/').any(|c| c == ".." || c == "." || c.is_empty()) {
        return err(
            field,
            format!("{p:?} must not contain empty, . or .. components"),
        );
    }
    if p.chars().any(char::is_control) {
        return err(field, "must not contain control characters");
    }
    Ok(())
}

/// The file name a downloaded model is stored under: `fileName`, else the URL's last path
/// segment (without query or fragment).
pub fn download_file_name(u: &UrlSource) -> String {
    match &u.file_name {
        Some(f) => f.clone(),
        None => {
            let path = u.url.split(['?', '#']).next().unwrap_or_default();
            path.rsplit('/').next().unwrap_or_default().to_string()
        }
    }
}

fn url_source(u: &UrlSource) -> Result<(), SpecError> {
    http_url("spec.model.source.url.url", &u.url, true)?;
    let file = download_file_name(u);
    let field = if u.file_name.is_some() {
        "spec.model.source.url.fileName"
    } else {
        "spec.model.source.url.url"
    };
    let plain = !file.is_empty()
        && !file.starts_with('.')
        && file.len() <= 255
        && file
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if !plain || !file.ends_with(".gguf") {
        return err(
            field,
            format!(
                "the file name {file:?} must be a plain name ending in .gguf (letters, digits, \
                 '.', '_', '-'); give fileName when the URL does not end with one"
            ),
        );
    }
    if let Some(s) = &u.sha256
        && !(s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        return err(
            "spec.model.source.url.sha256",
            "must be 64 hexadecimal digits",
        );
    }
    if let Some(size) = &u.cache_size {
        positive_quantity("spec.model.source.url.cacheSize", size)?;
    }
    if let Some(c) = &u.storage_class_name {
        class_name("spec.model.source.url.storageClassName", c)?;
    }
    if let Some(r) = &u.auth_secret_ref {
        secret_ref("spec.model.source.url.authSecretRef", r)?;
    }
    if let Some(i) = &u.image {
        image("spec.model.source.url.image", i)?;
    }
    Ok(())
}

/// An `http://` URL (or `https://` when `https` is allowed) with a host and no whitespace.
fn http_url(field: &str, u: &str, https: bool) -> Result<(), SpecError> {
    let rest = u.strip_prefix("http://").or_else(|| {
        if https {
            u.strip_prefix("https://")
        } else {
            None
        }
    });
    let Some(rest) = rest else {
        let want = if https {
            "http:// or https://"
        } else {
            "http://"
        };
        return err(field, format!("{u:?} must be an {want} URL"));
    };
    let host = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if host.is_empty() || u.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return err(
            field,
            format!("{u:?} must name a host and contain no spaces"),
        );
    }
    if host.contains('@') {
        return err(
            field,
            "must not carry credentials; use a Secret reference instead",
        );
    }
    Ok(())
}

fn positive_quantity(field: &str, q: &str) -> Result<(), SpecError> {
    match quantity::parse(q) {
        Ok(v) if v > 0.0 => Ok(()),
        Ok(_) => err(field, format!("{q:?} must be positive")),
        Err(e) => err(field, e.to_string()),
    }
}

fn class_name(field: &str, c: &str) -> Result<(), SpecError> {
    if is_dns_subdomain(c) {
        Ok(())
    } else {
        err(field, format!("{c:?} is not a valid class name"))
    }
}

fn secret_ref(field: &str, r: &SecretKeyRef) -> Result<(), SpecError> {
    if !is_dns_subdomain(&r.name) {
        return err(
            &format!("{field}.name"),
            format!("{:?} is not a Secret name", r.name),
        );
    }
    let key_ok = !r.key.is_empty()
        && r.key.len() <= 253
        && r.key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if !key_ok {
        return err(
            &format!("{field}.key"),
            format!(
                "{:?} is not a Secret key (letters, digits, '-', '_', '.')",
                r.key
            ),
        );
    }
    Ok(())
}

fn image(field: &str, i: &str) -> Result<(), SpecError> {
    if i.is_empty() || i.len() > 1024 || i.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return err(field, format!("{i:?} is not an image reference"));
    }
    Ok(())
}

fn resources(field: &str, r: &ResourceRequirements, gpu: Option<&str>) -> Result<(), SpecError> {
    for (kind, list) in [("requests", &r.requests), ("limits", &r.limits)] {
        for (name, q) in list.iter().flatten() {
            let f = format!("{field}.{kind}.{name}");
            if gpu == Some(name.as_str()) {
                return err(&f, "set GPUs with spec.engine.gpus, not in resources");
            }
            match quantity::parse(&q.0) {
                Ok(v) if v >= 0.0 => {}
                Ok(_) => return err(&f, format!("{:?} must not be negative", q.0)),
                Err(e) => return err(&f, e.to_string()),
            }
        }
    }
    Ok(())
}

fn extra_env(field: &str, env: Option<&Vec<EnvVar>>) -> Result<(), SpecError> {
    let mut seen = std::collections::BTreeSet::new();
    for (i, e) in env.into_iter().flatten().enumerate() {
        if !is_env_name(&e.name) {
            return err(
                &format!("{field}[{i}].name"),
                format!("{:?} is not an environment variable name", e.name),
            );
        }
        if !seen.insert(e.name.as_str()) {
            return err(
                &format!("{field}[{i}].name"),
                format!("{:?} is listed twice", e.name),
            );
        }
    }
    Ok(())
}

fn finite(field: &str, v: Option<f64>, min: f64, min_inclusive: bool) -> Result<(), SpecError> {
    if let Some(v) = v {
        let ok = v.is_finite() && if min_inclusive { v >= min } else { v > min };
        if !ok {
            let op = if min_inclusive { ">=" } else { ">" };
            return err(field, format!("{v} must be a finite number {op} {min}"));
        }
    }
    Ok(())
}

fn engine(e: &EngineSpec) -> Result<(), SpecError> {
    if e.replicas < 0 {
        return err("spec.engine.replicas", "must not be negative");
    }
    if let Some(i) = &e.image {
        image("spec.engine.image", i)?;
    }
    if !(0..=1).contains(&e.gpus) {
        return err(
            "spec.engine.gpus",
            format!(
                "{} must be 0 or 1: an engine computes on one GPU, so scale with replicas",
                e.gpus
            ),
        );
    }
    let qualified = match e.gpu_resource_name.split_once('/') {
        Some((domain, name)) => {
            is_dns_subdomain(domain)
                && !name.is_empty()
                && name.len() <= 63
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        }
        None => false,
    };
    if !qualified {
        return err(
            "spec.engine.gpuResourceName",
            format!(
                "{:?} must be an extended resource name such as nvidia.com/gpu",
                e.gpu_resource_name
            ),
        );
    }
    if e.backend == Backend::Cuda && e.gpus == 0 {
        return err("spec.engine.backend", "cuda needs spec.engine.gpus > 0");
    }
    if let Some(r) = &e.resources {
        resources("spec.engine.resources", r, Some(&e.gpu_resource_name))?;
    }
    if let Some(f) = e.device_memory_fraction
        && !(f.is_finite() && f > 0.0 && f <= 1.0)
    {
        return err(
            "spec.engine.deviceMemoryFraction",
            format!("{f} must be in (0, 1]"),
        );
    }
    let c = &e.cache;
    let block = c.block_size.unwrap_or(16);
    if !(1..=1024).contains(&block) {
        return err(
            "spec.engine.cache.blockSize",
            format!("{block} not in 1..=1024"),
        );
    }
    if let Some(d) = c.device_cache_tokens
        && d < 2 * i64::from(block)
    {
        return err(
            "spec.engine.cache.deviceCacheTokens",
            format!("{d} holds fewer than 2 blocks of {block} tokens"),
        );
    }
    if let Some(h) = c.host_cache_tokens
        && h < 0
    {
        return err("spec.engine.cache.hostCacheTokens", "must not be negative");
    }
    for (field, tokens) in [
        ("spec.engine.cache.deviceCacheTokens", c.device_cache_tokens),
        ("spec.engine.cache.hostCacheTokens", c.host_cache_tokens),
    ] {
        if let Some(t) = tokens
            && t / i64::from(block) > i64::from(u32::MAX)
        {
            return err(field, format!("{t} is too large"));
        }
    }
    if let Some(h) = &c.hotness {
        finite(
            "spec.engine.cache.hotness.halfLifeTurnovers",
            h.half_life_turnovers,
            0.0,
            false,
        )?;
        finite(
            "spec.engine.cache.hotness.admissionFloor",
            h.admission_floor,
            0.0,
            true,
        )?;
        finite(
            "spec.engine.cache.hotness.promotionIntervalSeconds",
            h.promotion_interval_seconds,
            0.0,
            false,
        )?;
        if let Some(b) = &h.promotion_budget {
            quantity::bytes(b).map_err(|e| SpecError {
                field: "spec.engine.cache.hotness.promotionBudget".into(),
                message: format!("{e}; it must be a whole number of bytes"),
            })?;
        }
    }
    let b = &e.batching;
    for (field, v, min) in [
        ("spec.engine.batching.maxRunning", b.max_running, 1),
        ("spec.engine.batching.maxBatchTokens", b.max_batch_tokens, 1),
        ("spec.engine.batching.maxWaiting", b.max_waiting, 0),
    ] {
        if let Some(v) = v
            && v < min
        {
            return err(field, format!("{v} must be at least {min}"));
        }
    }
    // The engine's defaults take part in the cross-check when one side is absent.
    let running = b.max_running.unwrap_or(16);
    let tokens = b.max_batch_tokens.unwrap_or(512);
    if running > tokens {
        return err(
            "spec.engine.batching.maxRunning",
            format!("{running} exceeds maxBatchTokens {tokens}"),
        );
    }
    if let Some(g) = e.shutdown_grace_seconds
        && !(0..=3600).contains(&g)
    {
        return err(
            "spec.engine.shutdownGraceSeconds",
            format!("{g} not in 0..=3600"),
        );
    }
    if !(10..=86_400).contains(&e.startup_timeout_seconds) {
        return err(
            "spec.engine.startupTimeoutSeconds",
            format!("{} not in 10..=86400", e.startup_timeout_seconds),
        );
    }
    for (field, v) in [
        ("spec.engine.priorityClassName", &e.priority_class_name),
        ("spec.engine.runtimeClassName", &e.runtime_class_name),
    ] {
        if let Some(v) = v {
            class_name(field, v)?;
        }
    }
    extra_env("spec.engine.extraEnv", e.extra_env.as_ref())
}

fn router(r: &RouterSpec) -> Result<(), SpecError> {
    if r.replicas < 0 {
        return err("spec.router.replicas", "must not be negative");
    }
    if let Some(i) = &r.image {
        image("spec.router.image", i)?;
    }
    if let Some(w) = &r.weights {
        if let Some(h) = w.host_weight
            && !(0.0..=1.0).contains(&h)
        {
            return err(
                "spec.router.weights.hostWeight",
                format!("{h} must be in [0, 1] (a device block's credit is 1)"),
            );
        }
        finite("spec.router.weights.loadWeight", w.load_weight, 0.0, true)?;
        finite(
            "spec.router.weights.queueExternality",
            w.queue_externality,
            0.0,
            true,
        )?;
        finite(
            "spec.router.weights.hotSpotFactor",
            w.hot_spot_factor,
            0.0,
            true,
        )?;
        // The router's own rule (HotPrefixWeights::validate): between 0 and 1 it would refuse
        // to start.
        if let Some(f) = w.hot_spot_factor
            && f > 0.0
            && f < 1.0
        {
            return err(
                "spec.router.weights.hotSpotFactor",
                format!("{f} must be 0 (off) or at least 1"),
            );
        }
        if let Some(ms) = w.recent_ms
            && ms < 0
        {
            return err("spec.router.weights.recentMs", "must not be negative");
        }
    }
    if let Some(k) = &r.api_key_secret_ref {
        secret_ref("spec.router.apiKeySecretRef", k)?;
    }
    if !(1..=65_535).contains(&r.service.port) {
        return err(
            "spec.router.service.port",
            format!("{} not in 1..=65535", r.service.port),
        );
    }
    if let Some(res) = &r.resources {
        resources("spec.router.resources", res, None)?;
    }
    if let Some(p) = &r.priority_class_name {
        class_name("spec.router.priorityClassName", p)?;
    }
    extra_env("spec.router.extraEnv", r.extra_env.as_ref())
}

fn managed_redis(m: &ManagedRedis) -> Result<(), SpecError> {
    if let Some(i) = &m.image {
        image("spec.redis.managed.image", i)?;
    }
    if let Some(r) = &m.resources {
        resources("spec.redis.managed.resources", r, None)?;
    }
    if let Some(p) = &m.password_secret_ref {
        secret_ref("spec.redis.managed.passwordSecretRef", p)?;
    }
    if let Some(s) = &m.persistence.size {
        positive_quantity("spec.redis.managed.persistence.size", s)?;
    }
    if let Some(c) = &m.persistence.storage_class_name {
        class_name("spec.redis.managed.persistence.storageClassName", c)?;
    }
    Ok(())
}

/// The URL engines and router are given for an external Redis: the spec's, with the scheme
/// `rediss://` when `tls` asks for TLS.
pub fn external_redis_url(e: &ExternalRedis) -> String {
    match (e.tls, e.url.strip_prefix("redis://")) {
        (Some(true), Some(rest)) => format!("rediss://{rest}"),
        _ => e.url.clone(),
    }
}

fn external_redis(e: &ExternalRedis) -> Result<(), SpecError> {
    let f = "spec.redis.external.url";
    let rest = e
        .url
        .strip_prefix("redis://")
        .or_else(|| e.url.strip_prefix("rediss://"));
    let Some(rest) = rest else {
        return err(f, "must be a redis:// or rediss:// URL");
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let (userinfo, host) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    if host.is_empty() || e.url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return err(f, "must name a host and contain no spaces");
    }
    // A password in the URL would be stored in the object and in the engines' ConfigMap.
    if userinfo.is_some_and(|u| u.contains(':')) {
        return err(
            f,
            "must not carry a password; put it in a Secret and name it in passwordSecretRef",
        );
    }
    let tls_url = e.url.starts_with("rediss://");
    if e.tls == Some(false) && tls_url {
        return err(
            "spec.redis.external.tls",
            "false contradicts a rediss:// url",
        );
    }
    if let Some(p) = &e.password_secret_ref {
        secret_ref("spec.redis.external.passwordSecretRef", p)?;
    }
    if let Some(ca) = &e.ca_secret_ref {
        if !(tls_url || e.tls == Some(true)) {
            return err(
                "spec.redis.external.caSecretRef",
                "needs TLS (a rediss:// url or tls: true)",
            );
        }
        secret_ref("spec.redis.external.caSecretRef", ca)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{HotPrefixServiceSpec, ModelSpec, RandomPreset, RandomSource, RouterWeights};
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

    fn hps(f: impl FnOnce(&mut HotPrefixServiceSpec)) -> HotPrefixService {
        let mut spec = HotPrefixServiceSpec {
            model: ModelSpec {
                name: None,
                source: ModelSource::Random(RandomSource {
                    preset: RandomPreset::Tiny,
                }),
                chat_template: None,
            },
            engine: EngineSpec::default(),
            router: RouterSpec::default(),
            redis: RedisSpec::default(),
            otlp_endpoint: None,
        };
        f(&mut spec);
        HotPrefixService::new("chat", spec)
    }

    fn field_of(h: &HotPrefixService) -> String {
        validate(h).expect_err("invalid").field
    }

    #[test]
    fn the_default_spec_is_valid() {
        validate(&hps(|_| {})).unwrap();
    }

    #[test]
    fn names_that_children_cannot_derive_from_are_refused() {
        for name in [
            "Chat",
            "1chat",
            "chat-",
            "a.b",
            &"a".repeat(MAX_NAME_LEN + 1),
        ] {
            let mut h = hps(|_| {});
            h.metadata.name = Some(name.to_string());
            assert_eq!(field_of(&h), "metadata.name", "{name}");
        }
    }

    #[test]
    fn a_host_cache_or_resource_that_is_not_a_quantity_names_its_field() {
        let h = hps(|s| {
            s.engine.resources = Some(ResourceRequirements {
                limits: Some([("memory".to_string(), Quantity("lots".into()))].into()),
                ..ResourceRequirements::default()
            });
        });
        let e = validate(&h).unwrap_err();
        assert_eq!(e.field, "spec.engine.resources.limits.memory");
        assert!(e.message.contains("not a Kubernetes quantity"), "{e}");
        let h = hps(|s| {
            s.engine.cache.hotness = Some(crate::crd::HotnessSpec {
                promotion_budget: Some("a lot".into()),
                ..Default::default()
            });
        });
        assert_eq!(field_of(&h), "spec.engine.cache.hotness.promotionBudget");
        let h = hps(|s| {
            s.engine.resources = Some(ResourceRequirements {
                limits: Some([("nvidia.com/gpu".to_string(), Quantity("1".into()))].into()),
                ..ResourceRequirements::default()
            });
        });
        assert_eq!(field_of(&h), "spec.engine.resources.limits.nvidia.com/gpu");
    }

    #[test]
    fn engine_rules_mirror_the_engine_flags() {
        type Edit = Box<dyn Fn(&mut HotPrefixServiceSpec)>;
        let cases: Vec<(Edit, &str)> = vec![
            (Box::new(|s| s.engine.replicas = -1), "spec.engine.replicas"),
            (Box::new(|s| s.engine.gpus = 2), "spec.engine.gpus"),
            (
                Box::new(|s| {
                    s.engine.backend = Backend::Cuda;
                    s.engine.gpus = 0;
                }),
                "spec.engine.backend",
            ),
            (
                Box::new(|s| s.engine.gpu_resource_name = "gpu".into()),
                "spec.engine.gpuResourceName",
            ),
            (
                Box::new(|s| s.engine.cache.device_cache_tokens = Some(16)),
                "spec.engine.cache.deviceCacheTokens",
            ),
            (
                Box::new(|s| s.engine.batching.max_running = Some(600)),
                "spec.engine.batching.maxRunning",
            ),
            (
                Box::new(|s| s.engine.device_memory_fraction = Some(1.5)),
                "spec.engine.deviceMemoryFraction",
            ),
            (
                Box::new(|s| {
                    s.engine.extra_env = Some(vec![
                        EnvVar {
                            name: "A".into(),
                            ..EnvVar::default()
                        },
                        EnvVar {
                            name: "A".into(),
                            ..EnvVar::default()
                        },
                    ]);
                }),
                "spec.engine.extraEnv[1].name",
            ),
            (
                Box::new(|s| s.otlp_endpoint = Some("https://otel:4318".into())),
                "spec.otlpEndpoint",
            ),
        ];
        for (f, field) in cases {
            assert_eq!(field_of(&hps(f)), field);
        }
    }

    #[test]
    fn router_weights_mirror_the_router_flags() {
        let with = |f: fn(&mut RouterWeights)| {
            hps(|s| {
                let mut w = RouterWeights::default();
                f(&mut w);
                s.router.weights = Some(w);
            })
        };
        // The router refuses a hot-spot factor in (0, 1) (HotPrefixWeights::validate).
        assert_eq!(
            field_of(&with(|w| w.hot_spot_factor = Some(0.5))),
            "spec.router.weights.hotSpotFactor"
        );
        assert_eq!(
            field_of(&with(|w| w.queue_externality = Some(-1.0))),
            "spec.router.weights.queueExternality"
        );
        assert_eq!(
            field_of(&with(|w| w.host_weight = Some(1.5))),
            "spec.router.weights.hostWeight"
        );
        for ok in [0.0, 1.0, 1.5] {
            let h = hps(|s| {
                s.router.weights = Some(RouterWeights {
                    hot_spot_factor: Some(ok),
                    ..RouterWeights::default()
                });
            });
            assert!(validate(&h).is_ok(), "hotSpotFactor {ok}");
        }
    }

    #[test]
    fn model_sources_are_checked() {
        use crate::crd::{HostPathSource, PvcSource};
        let url = |u: &str, name: Option<&str>| {
            ModelSource::Url(UrlSource {
                url: u.into(),
                sha256: None,
                file_name: name.map(str::to_string),
                cache_size: None,
                storage_class_name: None,
                auth_secret_ref: None,
                image: None,
            })
        };
        for (source, field) in [
            (url("ftp://h/m.gguf", None), "spec.model.source.url.url"),
            (url("https://h/model", None), "spec.model.source.url.url"),
            (
                url("https://h/model", Some("../m.gguf")),
                "spec.model.source.url.fileName",
            ),
            (
                url("https://user:pw@h/m.gguf", None),
                "spec.model.source.url.url",
            ),
            (
                ModelSource::Pvc(PvcSource {
                    claim_name: "models".into(),
                    path: "../etc".into(),
                }),
                "spec.model.source.pvc.path",
            ),
            (
                ModelSource::HostPath(HostPathSource {
                    path: "models/m.gguf".into(),
                }),
                "spec.model.source.hostPath.path",
            ),
        ] {
            let h = hps(|s| s.model.source = source.clone());
            assert_eq!(field_of(&h), field, "{source:?}");
        }
        let h = hps(|s| s.model.source = url("https://h/r/m.gguf?download=true", None));
        validate(&h).unwrap();
        let ModelSource::Url(u) = &h.spec.model.source else {
            unreachable!()
        };
        assert_eq!(download_file_name(u), "m.gguf");
    }

    #[test]
    fn a_chat_template_must_compile_and_fit() {
        let with = |t: &str| hps(|s| s.model.chat_template = Some(t.to_string()));
        validate(&with("{% for m in messages %}{{ m.content }}{% endfor %}")).unwrap();
        for (t, needle) in [
            (
                "{% for m in messages %}{{ m.content }}".to_string(),
                "does not compile",
            ),
            ("{{ ".to_string(), "does not compile"),
            (" \n ".to_string(), "blank"),
            ("x".repeat(MAX_CHAT_TEMPLATE_LEN + 1), "at most"),
        ] {
            let e = validate(&with(&t)).unwrap_err();
            assert_eq!(e.field, "spec.model.chatTemplate");
            assert!(e.message.contains(needle), "{e}");
        }
        // Characters, not bytes, as the schema's maxLength counts them.
        validate(&with(&"\u{e9}".repeat(MAX_CHAT_TEMPLATE_LEN))).unwrap();
    }

    #[test]
    fn external_redis_keeps_passwords_out_of_urls() {
        let ext = |url: &str, tls: Option<bool>| {
            RedisSpec::External(ExternalRedis {
                url: url.into(),
                password_secret_ref: None,
                tls,
                ca_secret_ref: None,
            })
        };
        let h = hps(|s| s.redis = ext("redis://:hunter2@redis:6379", None));
        let e = validate(&h).unwrap_err();
        assert_eq!(e.field, "spec.redis.external.url");
        assert!(!e.to_string().contains("hunter2"), "{e}");
        let h = hps(|s| s.redis = ext("rediss://redis:6380", Some(false)));
        assert_eq!(field_of(&h), "spec.redis.external.tls");
        let h = hps(|s| s.redis = ext("redis://", None));
        assert_eq!(field_of(&h), "spec.redis.external.url");
        // A user name alone (a Redis ACL user) is not a secret.
        validate(&hps(|s| s.redis = ext("redis://engine@redis:6379/2", None))).unwrap();
        let RedisSpec::External(e) = ext("redis://redis:6379", Some(true)) else {
            unreachable!()
        };
        assert_eq!(external_redis_url(&e), "rediss://redis:6379");
    }
}
