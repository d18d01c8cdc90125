//! The `hotprefix-bench` command-line contract that outside evaluation scripts rely on: flags,
//! the results.csv header, plots, and clear failures on bad input.

use std::path::Path;
use std::process::{Command, Output};

fn bench(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hotprefix-bench"))
        .args(args)
        .output()
        .expect("the hotprefix-bench binary runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A small trace in the Mooncake format: a shared system prompt and two multi-turn sessions.
fn write_trace(dir: &Path) -> String {
    let mut lines = String::new();
    for i in 0..40u64 {
        let session = i % 2;
        let turns = 1 + i / 2 % 4;
        let mut ids = vec![0u64];
        for t in 0..turns {
            ids.push(1000 * (session + 1) + t);
        }
        ids.push(100_000 + i);
        let input = ids.len() as u64 * 512 - 100;
        lines.push_str(&format!(
            "{{\"timestamp\": {}, \"input_length\": {input}, \"output_length\": 20, \"hash_ids\": {ids:?}}}\n",
            i * 500
        ));
    }
    let path = dir.join("small.jsonl");
    std::fs::write(&path, lines).expect("write trace");
    path.to_string_lossy().into_owned()
}

#[test]
fn sim_writes_the_contracted_csv_and_plots() {
    let dir = tempfile::tempdir().expect("tempdir");
    let trace = write_trace(dir.path());
    let out = dir.path().join("out");
    let o = bench(&[
        "sim",
        "--trace",
        &trace,
        "--policy",
        "hotprefix,lru,lru-offload,reuse-offload,optimal",
        "--replicas",
        "2",
        "--router",
        "least-load",
        "--model",
        "qwen2.5-7b",
        "--gpu",
        "h200",
        "--device-tokens",
        "8192",
        "--host-tokens",
        "32768",
        "--time-scale",
        "2",
        "--seed",
        "3",
        "--quiet",
        "--out",
        out.to_str().expect("utf-8 path"),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let table = String::from_utf8_lossy(&o.stdout);
    for p in ["hotprefix", "lru-offload", "reuse-offload", "optimal"] {
        assert!(table.contains(&format!("| {p} ")), "{table}");
    }
    let csv = std::fs::read_to_string(out.join("results.csv")).expect("results.csv");
    let mut lines = csv.lines();
    let header = lines.next().expect("header");
    assert!(
        header.starts_with(
            "policy,router,replicas,device_tokens,host_tokens,time_scale,requests,hit_ratio,\
             device_hit_ratio,host_hit_ratio,ttft_mean_s,ttft_p50_s,ttft_p99_s,throughput_tok_s,\
             h2d_bytes,d2h_bytes"
        ),
        "{header}"
    );
    let rows: Vec<&str> = lines.collect();
    assert_eq!(rows.len(), 5);
    assert!(
        rows[0].starts_with("hotprefix,least-load,2,8192,32768,2,40,"),
        "{}",
        rows[0]
    );
    for png in ["hit_ratio.png", "ttft.png", "bytes.png"] {
        let bytes = std::fs::read(out.join(png)).expect(png);
        assert!(bytes.starts_with(b"\x89PNG"), "{png}");
    }
}

#[test]
fn sim_runs_every_router_side_by_side() {
    let dir = tempfile::tempdir().expect("tempdir");
    let trace = write_trace(dir.path());
    let out = dir.path().join("out");
    let o = bench(&[
        "sim",
        "--trace",
        &trace,
        "--policy",
        "hotprefix,optimal",
        "--replicas",
        "3",
        "--router",
        "hotprefix,least-load,round-robin,consistent-hash,approx-tree,global",
        "--summary-interval-ms",
        "500",
        "--summary-top-k",
        "64",
        "--load-interval-ms",
        "100",
        "--approx-tree-blocks",
        "32",
        "--device-tokens",
        "8192",
        "--quiet",
        "--routing-stats",
        "--out",
        out.to_str().expect("utf-8 path"),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(
        table
            .contains("router hotprefix,least-load,round-robin,consistent-hash,approx-tree,global"),
        "{table}"
    );
    // The routing table: a row per router that routed (the offline bound routes nothing).
    let stats: Vec<&str> = table
        .lines()
        .skip_while(|l| !l.starts_with("| policy | router | decisions |"))
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .collect();
    assert_eq!(stats.len(), 6, "{table}");
    assert!(
        stats.iter().all(|r| r.starts_with("| hotprefix | ")),
        "{table}"
    );
    let csv = std::fs::read_to_string(out.join("results.csv")).expect("results.csv");
    let rows: Vec<&str> = csv.lines().skip(1).collect();
    // Six routers with hotprefix, and the bound once.
    assert_eq!(rows.len(), 7, "{csv}");
    for router in [
        "hotprefix",
        "least-load",
        "round-robin",
        "consistent-hash",
        "approx-tree",
        "global",
    ] {
        assert!(
            rows.iter()
                .any(|r| r.starts_with(&format!("hotprefix,{router},3,8192,32768,1,40,"))),
            "{router}: {csv}"
        );
    }
    assert!(out.join("ttft.png").exists());
}

#[test]
fn bad_router_weights_fail_with_the_field_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let trace = write_trace(dir.path());
    let o = bench(&[
        "sim",
        "--trace",
        &trace,
        "--policy",
        "lru",
        "--replicas",
        "2",
        "--router",
        "hotprefix",
        "--hot-spot-factor",
        "0.5",
        "--quiet",
    ]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.contains("hotprefix: hot_spot_factor"), "{err}");
}

#[test]
fn sweep_and_gen_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    let gen_path = dir.path().join("gen.jsonl");
    let o = bench(&[
        "gen",
        "shared-prefix",
        "--out",
        gen_path.to_str().expect("utf-8"),
        "--seed",
        "1",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = dir.path().join("sweep");
    let o = bench(&[
        "sweep",
        "--trace",
        gen_path.to_str().expect("utf-8"),
        "--device-tokens",
        "65536,131072",
        "--time-scale",
        "0.5,1",
        "--policy",
        "hotprefix,lru,optimal",
        "--quiet",
        "--out",
        out.to_str().expect("utf-8"),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let csv = std::fs::read_to_string(out.join("results.csv")).expect("results.csv");
    // 2 capacities x 2 loads x 2 policies, plus the bound once per capacity.
    assert_eq!(csv.lines().count(), 1 + 8 + 2);
    assert!(out.join("hit_ratio_vs_capacity.png").exists());
    assert!(out.join("ttft_vs_load_65536.png").exists());
}

#[test]
fn a_malformed_trace_line_fails_with_its_line_number() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad.jsonl");
    std::fs::write(
        &path,
        "{\"timestamp\": 0, \"input_length\": 600, \"output_length\": 1, \"hash_ids\": [1, 2]}\n\
         {\"timestamp\": 1, \"input_length\": \"many\", \"output_length\": 1, \"hash_ids\": [1]}\n",
    )
    .expect("write");
    let o = bench(&["sim", "--trace", path.to_str().expect("utf-8"), "--quiet"]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.contains("line 2"), "{err}");
}

#[test]
fn bad_flags_fail_with_a_clear_message() {
    for (args, needle) in [
        (
            vec!["sim", "--trace", "x.jsonl", "--policy", "fifo"],
            "unknown policy \"fifo\"",
        ),
        (
            vec!["sim", "--trace", "x.jsonl", "--router", "random"],
            "unknown router",
        ),
        (
            vec!["sim", "--trace", "x.jsonl", "--gpu", "a100"],
            "unknown gpu",
        ),
        (
            vec!["sim", "--trace", "x.jsonl", "--replicas", "0"],
            "replicas",
        ),
        (
            vec!["sim", "--trace", "x.jsonl", "--time-scale=-1"],
            "time-scale",
        ),
        (
            vec!["sim", "--trace", "x.jsonl", "--time-scale", "0"],
            "time-scale",
        ),
        (
            vec![
                "sweep",
                "--trace",
                "x.jsonl",
                "--device-tokens",
                "1000",
                "--jitter=-2",
            ],
            "jitter",
        ),
        (
            vec!["sim", "--trace", "/nonexistent/trace.jsonl"],
            "/nonexistent/trace.jsonl",
        ),
        (vec!["sim", "--trace", "gen:nope"], "unknown generator"),
        (
            vec!["sim", "--trace", "x.jsonl", "--summary-top-k", "0"],
            "--summary-top-k",
        ),
        (
            vec![
                "sweep",
                "--trace",
                "x.jsonl",
                "--device-tokens",
                "1000",
                "--router",
                "hotprefix,least-load",
            ],
            "one router",
        ),
    ] {
        let o = bench(&args);
        assert!(!o.status.success(), "{args:?} should fail");
        let err = stderr(&o);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}
