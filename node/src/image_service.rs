//! Daemon side of `image import|ls|export|verify`, and the `store` status section.
//! (`image.fetch` belongs to the swarm service.)

use std::path::PathBuf;
use std::sync::Arc;

use chunks::{DirectBoot, ImageId, ImportOptions, InputKind};
use serde::Deserialize;
use serde_json::{json, Value};
use tracing::{info, info_span};

use crate::control::{blocking, parse_params, Progress, Router};
use crate::error::{Error, Result};
use crate::node::Node;

#[derive(Deserialize)]
struct ImportParams {
    /// The image file (or, for direct boot, the optional disk).
    #[serde(default)]
    path: Option<PathBuf>,
    #[serde(default)]
    disk: Option<PathBuf>,
    #[serde(default)]
    kernel: Option<PathBuf>,
    #[serde(default)]
    initrd: Option<PathBuf>,
    #[serde(default)]
    cmdline: Option<String>,
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    name: Option<String>,
}

#[derive(Deserialize)]
struct ExportParams {
    id: String,
    path: PathBuf,
}

pub fn parse_image_id(s: &str) -> Result<ImageId> {
    s.parse::<ImageId>().map_err(Error::from)
}

pub fn register(router: &mut Router, node: Arc<Node>) {
    let n = node.clone();
    router.method("image.import", move |params, progress: Progress| {
        let node = n.clone();
        async move {
            let p: ImportParams = parse_params(params)?;
            let kind = match p.kind.as_deref() {
                None => None,
                Some("raw") => Some(InputKind::Raw),
                Some("iso") => Some(InputKind::Iso),
                Some("qcow2") => Some(InputKind::Qcow2),
                Some(other) => {
                    return Err(Error::BadArg {
                        what: "--format",
                        reason: format!("{other:?} is not raw, iso or qcow2"),
                    })
                }
            };
            blocking(move || {
                let tmp = node.settings.data_dir.join("tmp");
                std::fs::create_dir_all(&tmp)
                    .map_err(|e| Error::io(format!("creating {}", tmp.display()), e))?;
                let report = |done, total| progress.report("import", done, total);
                let key = node.identity.signing_key();
                let (id, m) = match p.kernel {
                    Some(kernel) => {
                        let _span = info_span!("import", kernel = %kernel.display()).entered();
                        let name = p.name.unwrap_or_else(|| {
                            kernel
                                .file_name()
                                .map(|n| n.to_string_lossy().into_owned())
                                .unwrap_or_else(|| "direct-boot".into())
                        });
                        let parts = DirectBoot {
                            kernel,
                            initrd: p.initrd,
                            disk: p.disk.or(p.path),
                            cmdline: p.cmdline.unwrap_or_default(),
                        };
                        chunks::import_direct_boot(
                            &node.store,
                            key,
                            &parts,
                            &name,
                            Some(&tmp),
                            report,
                        )?
                    }
                    None => {
                        let path = p.path.ok_or(Error::BadArg {
                            what: "image file",
                            reason: "give a file to import, or --kernel for a direct-boot image"
                                .into(),
                        })?;
                        let _span = info_span!("import", file = %path.display()).entered();
                        let opts = ImportOptions {
                            name: p.name,
                            kind,
                            temp_dir: Some(tmp),
                        };
                        chunks::import_file(&node.store, key, &path, &opts, report)?
                    }
                };
                node.store.flush()?;
                let man = m.manifest();
                info!(image = %id, size = man.total_size, chunks = man.chunks.len(), "imported");
                Ok(json!({
                    "id": id.to_hex(),
                    "name": man.name,
                    "size": man.total_size,
                    "chunks": man.chunks.len(),
                }))
            })
            .await
        }
    });

    let n = node.clone();
    router.method("image.ls", move |_, _| {
        let node = n.clone();
        async move {
            blocking(move || {
                let mut out = Vec::new();
                for id in node.store.list_images()? {
                    let info = node.store.image_info(id)?;
                    let boot = node
                        .store
                        .get_manifest(id)?
                        .and_then(|m| m.manifest().boot.clone());
                    out.push(json!({
                        "id": id.to_hex(),
                        "name": info.name,
                        "format": format!("{:?}", info.format).to_lowercase(),
                        "size": info.total_size,
                        "chunks": info.unique_chunks,
                        "present_chunks": info.present_chunks,
                        "complete": info.is_complete(),
                        "pinned": info.pinned,
                        "boot": boot,
                    }));
                }
                Ok(Value::Array(out))
            })
            .await
        }
    });

    let n = node.clone();
    router.method("image.export", move |params, _| {
        let node = n.clone();
        async move {
            let p: ExportParams = parse_params(params)?;
            let id = parse_image_id(&p.id)?;
            blocking(move || {
                let _span = info_span!("export", image = %id).entered();
                let bytes = chunks::export(&node.store, id, &p.path)?;
                Ok(json!({ "id": id.to_hex(), "bytes": bytes, "path": p.path }))
            })
            .await
        }
    });

    let n = node.clone();
    router.method("image.verify", move |_, _| {
        let node = n.clone();
        async move {
            blocking(move || {
                let report = node.store.verify_all()?;
                Ok(serde_json::to_value(report).expect("report serialises"))
            })
            .await
        }
    });

    let n = node;
    router.status_section("store", move || {
        json!({
            "path": n.store.path().display().to_string(),
            "size_bytes": n.store.size_bytes(),
            "cap_bytes": n.store.cap_bytes(),
            "chunks": n.store.chunk_count(),
            "images": n.store.list_images().map(|v| v.len()).unwrap_or(0),
            "bad_chunks_removed": n.store.bad_chunks_removed(),
            // True after a write made no progress for the stall limit: the store
            // refuses writes until the daemon restarts (see the log).
            "write_stalled": n.store.is_stalled(),
        })
    });
}
