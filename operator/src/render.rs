//! What `hotprefix-operator render` prints: the objects the operator would apply for a
//! HotPrefixService read from YAML, so a spec can be reviewed (or diffed, or validated) before
//! it is applied. The golden files of the builder tests are this output for the examples.

use crate::crd::HotPrefixService;
use crate::resources::{self, Defaults, RenderError};
use crate::validate::SpecError;

/// A HotPrefixService that cannot be rendered.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The YAML is not a HotPrefixService.
    #[error("not a HotPrefixService: {0}")]
    Parse(String),
    /// Its spec is invalid.
    #[error("invalid spec")]
    Spec(#[from] SpecError),
    /// Writing the objects failed.
    #[error(transparent)]
    Render(#[from] RenderError),
}

/// Parses a HotPrefixService from one YAML document, checking its kind and API version.
pub fn parse(yaml: &str) -> Result<HotPrefixService, Error> {
    let value: serde_json::Value =
        serde_saphyr::from_str(yaml).map_err(|e| Error::Parse(e.to_string()))?;
    let api_version = value.get("apiVersion").and_then(|v| v.as_str());
    let kind = value.get("kind").and_then(|v| v.as_str());
    let want = format!("{}/{}", crate::crd::GROUP, crate::crd::VERSION);
    if api_version != Some(want.as_str()) || kind != Some("HotPrefixService") {
        return Err(Error::Parse(format!(
            "expected apiVersion {want} and kind HotPrefixService, found {} {}",
            api_version.unwrap_or("(none)"),
            kind.unwrap_or("(none)")
        )));
    }
    serde_json::from_value(value).map_err(|e| Error::Parse(e.to_string()))
}

/// The children of the HotPrefixService in `yaml` as multi-document YAML. `namespace` is used
/// when the object names none; with `uid` the children carry the owner reference the operator
/// would give them.
pub fn render(
    yaml: &str,
    namespace: &str,
    uid: Option<&str>,
    defaults: &Defaults,
) -> Result<String, Error> {
    let mut hps = parse(yaml)?;
    if hps.metadata.namespace.is_none() {
        hps.metadata.namespace = Some(namespace.to_string());
    }
    if let Some(uid) = uid {
        hps.metadata.uid = Some(uid.to_string());
    }
    Ok(resources::build(&hps, defaults)?.to_yaml()?)
}
