//! How a pod gets the model: the `--model` value, the volumes and mounts, for a URL source the
//! init container that downloads the file once into a cache volume, and the ConfigMap of a
//! chat template override with its mount. Engine and router pods both read the model and the
//! template (the router tokenizes requests exactly as the engines do).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    ConfigMap, ConfigMapVolumeSource, Container, EmptyDirVolumeSource, HostPathVolumeSource,
    KeyToPath, PersistentVolumeClaim, PersistentVolumeClaimSpec, PersistentVolumeClaimVolumeSource,
    Volume, VolumeMount, VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::{Ctx, container_security, env, secret_env};
use crate::crd::{ModelSource, UrlSource};
use crate::validate::download_file_name;

/// Where model volumes are mounted.
pub(crate) const MODELS_DIR: &str = "/models";
/// The name of the model volume (and of the engines' cache claim template).
pub(crate) const MODEL_VOLUME: &str = "model";
/// The default size of a download cache volume.
pub(crate) const DEFAULT_CACHE_SIZE: &str = "20Gi";
/// Where the chat template ConfigMap is mounted in engine and router pods.
pub(crate) const CHAT_TEMPLATE_DIR: &str = "/etc/hotprefix/chat-template";
/// The chat template's key in its ConfigMap, and its file name in the mount.
pub(crate) const CHAT_TEMPLATE_KEY: &str = "chat_template.jinja";
/// The name of the chat template volume.
const CHAT_TEMPLATE_VOLUME: &str = "chat-template";

/// The download: keeps a complete, verified file, resumes a partial one (a server that cannot
/// resume gets a fresh download), and never leaves a partial file under the final name (it is
/// renamed only once complete and checked). The URL, file name, checksum and token arrive as
/// environment variables, so nothing from the spec is ever interpreted by the shell; the token
/// reaches curl through a header file, not its command line, and the file is removed on exit.
pub(crate) const DOWNLOAD_SCRIPT: &str = r#"set -eu
dest="$MODEL_DIR/$MODEL_FILE"
verify() {
  [ -z "${MODEL_SHA256:-}" ] || echo "$MODEL_SHA256  $1" | sha256sum -c - >/dev/null 2>&1
}
if [ -f "$dest" ]; then
  if verify "$dest"; then
    echo "model cached at $dest"
    exit 0
  fi
  echo "cached $dest fails its checksum; downloading again"
  rm -f "$dest"
fi
header="${TMPDIR:-/tmp}/download-header"
trap 'rm -f "$header"' EXIT
: > "$header"
if [ -n "${DOWNLOAD_TOKEN:-}" ]; then
  printf 'Authorization: Bearer %s\n' "$DOWNLOAD_TOKEN" > "$header"
fi
fetch() {
  curl --fail --location --silent --show-error --retry 5 --retry-delay 5 \
    --header "@$header" --output "$dest.part" "$@" "$MODEL_URL"
}
echo "downloading $MODEL_URL to $dest"
if ! fetch --continue-at -; then
  echo "resuming failed; downloading from the start"
  rm -f "$dest.part"
  fetch
fi
if ! verify "$dest.part"; then
  echo "error: the download of $MODEL_URL does not have SHA-256 $MODEL_SHA256" >&2
  rm -f "$dest.part"
  exit 1
fi
mv "$dest.part" "$dest"
echo "model downloaded to $dest"
"#;

/// Which kind of pod the model is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PodKind {
    /// An engine pod of the StatefulSet: a download goes to its own persistent claim.
    Engine,
    /// A router pod of the Deployment: a download goes to an emptyDir that survives container
    /// restarts.
    Router,
}

/// What a pod needs to read the model.
#[derive(Debug, Default)]
pub(crate) struct ModelMount {
    /// The `--model` value (`HOTPREFIX_MODEL`).
    pub model: String,
    /// The `--chat-template` value (`HOTPREFIX_CHAT_TEMPLATE`), when the spec overrides the
    /// model's template (its volume and mount are among the others).
    pub chat_template: Option<String>,
    /// Pod volumes.
    pub volumes: Vec<Volume>,
    /// The serving container's mounts.
    pub mounts: Vec<VolumeMount>,
    /// The download init container, for a URL source.
    pub init: Option<Container>,
    /// The StatefulSet's claim template of the download cache (engines, URL source).
    pub claim_template: Option<PersistentVolumeClaim>,
}

fn mount(read_only: bool, mount_path: String) -> VolumeMount {
    VolumeMount {
        name: MODEL_VOLUME.into(),
        mount_path,
        read_only: Some(read_only),
        ..VolumeMount::default()
    }
}

/// The model of `ctx`'s spec for a pod of `kind`, with its chat template override.
pub(crate) fn model_mount(ctx: &Ctx<'_>, kind: PodKind) -> ModelMount {
    let mut m = source_mount(ctx, kind);
    if ctx.hps.spec.model.chat_template.is_some() {
        m.volumes.push(Volume {
            name: CHAT_TEMPLATE_VOLUME.into(),
            config_map: Some(ConfigMapVolumeSource {
                name: ctx.names.chat_template(),
                items: Some(vec![KeyToPath {
                    key: CHAT_TEMPLATE_KEY.into(),
                    path: CHAT_TEMPLATE_KEY.into(),
                    ..KeyToPath::default()
                }]),
                optional: Some(false),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        });
        m.mounts.push(VolumeMount {
            name: CHAT_TEMPLATE_VOLUME.into(),
            mount_path: CHAT_TEMPLATE_DIR.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        });
        m.chat_template = Some(format!("{CHAT_TEMPLATE_DIR}/{CHAT_TEMPLATE_KEY}"));
    }
    m
}

/// The ConfigMap holding the spec's chat template, when it has one. Its own object, not a key
/// of the engine ConfigMap: that one is loaded with `envFrom`, which would make the template
/// an environment variable too.
pub(crate) fn chat_template_config_map(ctx: &Ctx<'_>) -> Option<ConfigMap> {
    let t = ctx.hps.spec.model.chat_template.as_ref()?;
    Some(ConfigMap {
        metadata: ctx.meta(ctx.names.chat_template(), "model"),
        data: Some(BTreeMap::from([(CHAT_TEMPLATE_KEY.to_string(), t.clone())])),
        ..ConfigMap::default()
    })
}

/// The volumes and mounts of the model's source.
fn source_mount(ctx: &Ctx<'_>, kind: PodKind) -> ModelMount {
    match &ctx.hps.spec.model.source {
        ModelSource::Random(r) => ModelMount {
            model: format!("random:{}", r.preset.as_str()),
            ..ModelMount::default()
        },
        ModelSource::Pvc(p) => ModelMount {
            model: format!("{MODELS_DIR}/{}", p.path),
            volumes: vec![Volume {
                name: MODEL_VOLUME.into(),
                persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                    claim_name: p.claim_name.clone(),
                    read_only: Some(true),
                }),
                ..Volume::default()
            }],
            mounts: vec![mount(true, MODELS_DIR.into())],
            ..ModelMount::default()
        },
        ModelSource::HostPath(h) => {
            // Mounted under its own base name: the engine tells a .gguf file from a model
            // directory by the path.
            let base = h
                .path
                .trim_end_matches('/')
                .rsplit('/')
                .next()
                .unwrap_or("model");
            let path = format!("{MODELS_DIR}/{base}");
            ModelMount {
                model: path.clone(),
                volumes: vec![Volume {
                    name: MODEL_VOLUME.into(),
                    host_path: Some(HostPathVolumeSource {
                        path: h.path.clone(),
                        // A typed hostPath makes a node without the model fail the mount with an
                        // event naming the path; untyped, the kubelet would create an empty
                        // directory there and the engine would crash-loop on it instead.
                        type_: Some(
                            if h.path.to_ascii_lowercase().ends_with(".gguf") {
                                "File"
                            } else {
                                "Directory"
                            }
                            .into(),
                        ),
                    }),
                    ..Volume::default()
                }],
                mounts: vec![mount(true, path)],
                ..ModelMount::default()
            }
        }
        ModelSource::Url(u) => url_mount(ctx, u, kind),
    }
}

fn url_mount(ctx: &Ctx<'_>, u: &UrlSource, kind: PodKind) -> ModelMount {
    let file = download_file_name(u);
    let size = u
        .cache_size
        .clone()
        .unwrap_or_else(|| DEFAULT_CACHE_SIZE.into());
    let mut vars = vec![
        env("MODEL_DIR", MODELS_DIR),
        env("MODEL_URL", u.url.clone()),
        env("MODEL_FILE", file.clone()),
    ];
    if let Some(sha) = &u.sha256 {
        vars.push(env("MODEL_SHA256", sha.to_ascii_lowercase()));
    }
    if let Some(token) = &u.auth_secret_ref {
        vars.push(secret_env("DOWNLOAD_TOKEN", token));
    }
    let init = Container {
        name: "download-model".into(),
        image: Some(
            u.image
                .clone()
                .unwrap_or_else(|| ctx.defaults.downloader_image.clone()),
        ),
        command: Some(vec!["/bin/sh".into(), "-c".into(), DOWNLOAD_SCRIPT.into()]),
        env: Some(vars),
        volume_mounts: Some(vec![
            mount(false, MODELS_DIR.into()),
            VolumeMount {
                name: "tmp".into(),
                mount_path: "/tmp".into(),
                ..VolumeMount::default()
            },
        ]),
        security_context: Some(container_security()),
        ..Container::default()
    };
    let mut m = ModelMount {
        model: format!("{MODELS_DIR}/{file}"),
        mounts: vec![mount(true, MODELS_DIR.into())],
        init: Some(init),
        ..ModelMount::default()
    };
    match kind {
        PodKind::Engine => {
            m.claim_template = Some(PersistentVolumeClaim {
                metadata: ObjectMeta {
                    name: Some(MODEL_VOLUME.into()),
                    labels: Some(ctx.labels("engine")),
                    ..ObjectMeta::default()
                },
                spec: Some(PersistentVolumeClaimSpec {
                    access_modes: Some(vec!["ReadWriteOnce".into()]),
                    storage_class_name: u.storage_class_name.clone(),
                    resources: Some(VolumeResourceRequirements {
                        requests: Some(BTreeMap::from([("storage".into(), Quantity(size))])),
                        ..VolumeResourceRequirements::default()
                    }),
                    ..PersistentVolumeClaimSpec::default()
                }),
                ..PersistentVolumeClaim::default()
            });
        }
        PodKind::Router => m.volumes.push(Volume {
            name: MODEL_VOLUME.into(),
            empty_dir: Some(EmptyDirVolumeSource {
                size_limit: Some(Quantity(size)),
                ..EmptyDirVolumeSource::default()
            }),
            ..Volume::default()
        }),
    }
    m
}
