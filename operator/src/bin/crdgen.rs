//! `crdgen`: prints the HotPrefixService CustomResourceDefinition as YAML, or writes it to the
//! files given as arguments (`crds/` and the chart's `crds/` folder hold the committed copies).

fn main() -> anyhow::Result<()> {
    let yaml = hotprefix_operator::crd::definition_yaml()?;
    let paths: Vec<String> = std::env::args().skip(1).collect();
    if paths.is_empty() {
        print!("{yaml}");
        return Ok(());
    }
    for path in paths {
        std::fs::write(&path, &yaml).map_err(|e| anyhow::anyhow!("writing {path}: {e}"))?;
        eprintln!("wrote {path}");
    }
    Ok(())
}
