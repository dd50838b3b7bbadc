import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO

from ssam.pipeline.cli import main
from ssam.pipeline.config import ConfigError, config_reference, load_config
from ssam.pipeline.inputs import InputError, check_inputs

SMOKE = REPO / "configs/pipeline/smoke.yaml"


def test_every_shipped_config_loads():
    for path in sorted((REPO / "configs/pipeline").glob("*.yaml")):
        cfg = load_config(path)
        assert cfg.output.dir
    assert load_config(SMOKE).smoke and not load_config(REPO / "configs/pipeline/sample.yaml").smoke


def test_unknown_key_names_file_key_and_expected(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(SMOKE.read_text().replace("points_per_side: 8", "points_per_sid: 8"))
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    msg = str(e.value)
    assert (
        str(bad) in msg
        and "masks.points_per_sid" in msg
        and "unknown key" in msg
        and "points_per_side" in msg
    )


@pytest.mark.parametrize(
    "override, needle",
    [
        ("masks.points_per_side=many", "masks.points_per_side"),
        ("labels.background=paint", "labels.background"),
        ("output.samples_per_shard=0", "greater than or equal to 1"),
        ("masks.sam_model=vit_z", "unknown SAM size"),
        ("candidates.backend=openai", "candidates.backend"),
        ("nonsense.key=1", "unknown key"),
        ('candidates.prompt_templates=["no placeholder"]', "{caption}"),
        ("ray.masks.min_workers=3", "min_workers 3 > max_workers 1"),
    ],
)
def test_wrong_values_are_refused_with_the_key(override, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        load_config(SMOKE, [override])


def test_set_overrides_single_keys_as_yaml():
    cfg = load_config(
        SMOKE, ["masks.points_per_side=16", "filter.languages=[en, de]", "labels.clip_pretrained=null"]
    )
    assert (
        cfg.masks.points_per_side == 16
        and cfg.filter.languages == ["en", "de"]
        and cfg.labels.clip_pretrained is None
    )


def test_a_section_set_in_part_keeps_the_defaults_its_parent_gives_it(tmp_path):
    # ray.write is built with 0.25 CPUs and 4 tasks at once (not StageResources' 1 and 1): setting
    # one of its keys, by --set or in the YAML, leaves the others as they were
    cfg = load_config(SMOKE, ["ray.write.batch_size=128"])
    w = cfg.ray.write
    assert (w.batch_size, w.num_cpus, w.max_workers) == (128, 0.25, 4)
    path = tmp_path / "c.yaml"
    path.write_text(
        "input: {path: x.parquet}\noutput: {dir: out}\nray:\n  dedup: {batch_size: 8}\n  read: {max_workers: 2}\n"
    )
    cfg = load_config(path)
    assert (cfg.ray.dedup.batch_size, cfg.ray.dedup.num_cpus) == (8, 0.25)
    assert (cfg.ray.read.max_workers, cfg.ray.read.num_cpus) == (2, 0)
    assert cfg.ray.write == load_config(path, ["ray.write={}"]).ray.write  # an empty section: all defaults


def test_config_reference_lists_every_key_and_the_readme_documents_them():
    rows = config_reference()
    keys = [r.split("`")[1] for r in rows]
    for k in (
        "input.path",
        "output.dir",
        "output.samples_per_shard",
        "download.allow_private_hosts",
        "download.allow_file_urls",
        "decode.image_size",
        "masks.points_per_side",
        "candidates.backend",
        "candidates.max_candidates",
        "labels.score_threshold",
        "ray.masks.num_gpus",
    ):
        assert k in keys
    readme = (REPO / "README.md").read_text()
    missing = [k for k in keys if f"`{k}`" not in readme]
    assert missing == [], f"README config reference lacks {missing}"
    # each row as generated: the default a section's parent gives it (ray.write's 0.25 CPUs), not
    # its class's (1), and the description as the code has it
    stale = [r for r in rows if r not in readme]
    assert stale == [], "README rows differ from `ssam-pipeline config-reference`:\n" + "\n".join(stale)
    assert "| `ray.write.num_cpus` | `float` | `0.25` |" in "\n".join(rows)


def _parquet(path, **cols):
    pq.write_table(pa.table(cols), path)
    return str(path)


def test_input_schema_errors_name_the_file_and_column(tmp_path):
    no_url = _parquet(tmp_path / "a.parquet", link=["http://x"], TEXT=["c"])
    with pytest.raises(InputError, match=r"a\.parquet: missing url column 'URL'"):
        check_inputs(load_config(SMOKE, [f"input.path={no_url}"]))
    int_url = _parquet(tmp_path / "b.parquet", URL=[1, 2], TEXT=["c", "d"])
    with pytest.raises(InputError, match=r"b\.parquet: column 'URL' has type int64, expected a string"):
        check_inputs(load_config(SMOKE, [f"input.path={int_url}"]))
    str_width = _parquet(tmp_path / "c.parquet", URL=["u"], TEXT=["c"], WIDTH=["wide"])
    with pytest.raises(InputError, match="'WIDTH' has type string, expected a numeric"):
        check_inputs(load_config(SMOKE, [f"input.path={str_width}"]))
    (tmp_path / "d.parquet").write_text("not parquet")
    with pytest.raises(InputError, match="not a readable parquet"):
        check_inputs(load_config(SMOKE, [f"input.path={tmp_path / 'd.parquet'}"]))
    with pytest.raises(InputError, match="no parquet file found"):
        check_inputs(load_config(SMOKE, [f"input.path={tmp_path / 'none*.parquet'}"]))


def test_cli_exits_2_before_any_work_on_bad_input(tmp_path, capsys):
    no_url = _parquet(tmp_path / "a.parquet", link=["http://x"], TEXT=["c"])
    assert main(["run", str(SMOKE), "--input", no_url, "--output", str(tmp_path / "run")]) == 2
    assert "missing url column 'URL'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing was started
    assert main(["run", str(SMOKE), "--set", "masks.bogus=1", "--output", str(tmp_path / "run")]) == 2
    assert "masks.bogus" in capsys.readouterr().err


def test_cli_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = capsys.readouterr().out
    for flag in ("--input", "--output", "--set", "config"):
        assert flag in out


def test_sample_config_without_weights_stops_with_one_clear_paragraph(tmp_path, capsys):
    code = main(["run", str(REPO / "configs/pipeline/sample.yaml"), "--output", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 3
    assert (
        "SAM vit_b" in err
        and "CLIP ViT-B-32/laion2b_s34b_b79k" in err
        and "Qwen/Qwen2.5-0.5B-Instruct" in err
    )
    assert "make demo SMOKE=1" in err and "masks.sam_checkpoint" in err
    assert err.strip().count("\n") == 0  # one paragraph
    assert not (tmp_path / "run").exists()


def test_actor_pools_that_cannot_fit_the_cluster_are_refused_before_any_download(tmp_path, ray_loopback):
    from conftest import REPO

    from ssam.pipeline.config import ConfigError, load_config
    from ssam.pipeline.run import run_pipeline

    cfg = load_config(
        REPO / "configs/pipeline/smoke.yaml",
        [
            f"output.dir={tmp_path / 'run'}",
            f"input.path={REPO / 'sample/pairs.parquet'}",
            "ray.masks.num_cpus=64",
            "ray.labels.resources={big_gpu_node: 1}",
        ],
    )
    with pytest.raises(ConfigError, match="CPU: needs 65.*big_gpu_node: needs 1, cluster has 0"):
        run_pipeline(cfg, log=lambda m: None)
    assert not (tmp_path / "run/downloads").exists()  # nothing was fetched


def test_each_pool_gets_its_size_and_in_flight_bound_from_the_config(tmp_path, ray_loopback):
    # Backpressure: an actor pool queues at most ray.<stage>.max_in_flight batches per actor.
    from conftest import REPO

    from ssam.pipeline.config import load_config
    from ssam.pipeline.graph import build_dataset

    cfg = load_config(
        REPO / "configs/pipeline/smoke.yaml",
        [
            f"output.dir={tmp_path}",
            "ray.masks.max_in_flight=1",
            "ray.labels.max_workers=3",
            "ray.write.max_workers=5",
        ],
    )
    op, computes = build_dataset(cfg, [str(tmp_path / "00000")], str(tmp_path), {})._logical_plan.dag, {}
    while op.input_dependencies:
        computes[op.name] = op.compute
        op = op.input_dependencies[0]
    masks, labels = computes["MapBatches(MaskStage)"], computes["MapBatches(LabelStage)"]
    assert (masks.min_size, masks.max_size, masks.max_tasks_in_flight_per_actor) == (1, 1, 1)
    assert (labels.max_size, labels.max_tasks_in_flight_per_actor) == (3, 2)
    assert computes["MapBatches(write_parts)"].size == 5
