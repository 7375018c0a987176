"""--log.wandb: an offline wandb run read back from its .wandb file holds what metrics.jsonl holds.

The .wandb file is read with a small reader of its framing (the LevelDB log format wandb writes: a 7-byte
header, 32 KiB blocks, records split into FULL/FIRST/MIDDLE/LAST chunks) and wandb's own protobuf
``Record``: independent of our writer, and of wandb's upload path.
"""

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import tiny
import wandb
from wandb.proto import wandb_internal_pb2 as pb  # wandb's own schema (the dev extra installs wandb)

from saeforge.cli import main
from saeforge.config import ConfigError, LogConfig
from saeforge.training.config import RunConfig
from saeforge.training.wandb_log import RUN_ID_FILE, WandbMissing, WandbRun

HOOK = "blocks.1.hook_resid_post"
BLOCK = 32768


def wandb_records(path: Path):
    """Every protobuf Record in a .wandb file, in order."""
    data = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0)
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left < 7 or (kind == 0 and length == 0):  # block trailer / padding
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):  # FULL or LAST: a whole record
            rec = pb.Record()
            rec.ParseFromString(buf)
            yield rec


def read_offline_run(wandb_dir: Path) -> dict:
    """history {step: {key: value}}, config {key: value}, summary {key: value}, run id, artifacts, exit code."""
    (path,) = wandb_dir.glob("wandb/offline-run-*/run-*.wandb")
    out = {"history": {}, "config": {}, "summary": {}, "artifacts": [], "exit_code": None}
    for rec in wandb_records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out["run_id"] = rec.run.run_id
            out["config"].update({i.key: json.loads(i.value_json) for i in rec.run.config.update if i.key})
        elif kind == "config":
            out["config"].update({i.key: json.loads(i.value_json) for i in rec.config.update if i.key})
        elif kind == "history":
            row = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in rec.history.item}
            out["history"].setdefault(row["_step"], {}).update(row)
        elif kind == "summary":
            out["summary"].update(
                {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in rec.summary.update}
            )
        elif kind == "artifact":
            out["artifacts"].append(rec.artifact)
        elif kind == "exit":
            out["exit_code"] = rec.exit.exit_code
    return out


@pytest.fixture
def offline(tmp_path, monkeypatch):
    d = tmp_path / "wandb_home"
    d.mkdir()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(d))
    for k in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):  # else ~/.cache, ~/.config, ~/.local/share
        monkeypatch.setenv(k, str(tmp_path / k.lower()))
    return d


def tiny_train(model, corpus, out, *extra):
    options = {"hook": HOOK, "tokens": 4096, "activations.shuffle_sequences": 16, "sae.d_sae": 128, "sae.k": 8}
    return tiny.train_args(model, corpus, out, "run", options | {"train.log_every_steps": 5}, "--quiet", *extra)


@pytest.mark.slow
def test_offline_run_holds_metrics_config_eval_and_artifact(tiny_model_dirs, text_corpus, tmp_path, offline):
    args = tiny_train(tiny_model_dirs["llama"], text_corpus, tmp_path / "runs", "--eval.tokens", 2048)
    args += ["--eval.ce_tokens", "512", "--log.wandb", "saeforge-test", "--log.wandb_artifact", "true"]
    assert main(list(map(str, args))) == 0
    wandb.teardown()  # finish() can return before wandb's service has flushed the .wandb file; teardown waits for it
    run_dir = tmp_path / "runs" / "run"
    lines = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    got = read_offline_run(offline)

    # history: one row per metrics.jsonl line, at its step, with exactly its numbers
    assert [r["step"] for r in lines] == [5, 10, 15, 16]
    assert sorted(got["history"]) == [5, 10, 15, 16]
    for rec in lines:
        row = got["history"][rec["step"]]
        assert {k: row[k] for k in rec if k != "step"} == {k: v for k, v in rec.items() if k != "step"}

    # config: the run's config.json, section by section
    saved = json.loads((run_dir / "config.json").read_text())
    assert {k: got["config"][k] for k in saved} == saved
    assert got["config"]["log"]["wandb"] == "saeforge-test"

    # eval: the summary carries eval.json's scalars; the table is logged too
    ev = json.loads((run_dir / "sae" / "eval.json").read_text())
    assert got["summary"]["eval/explained_variance"] == ev["explained_variance"]
    assert got["summary"]["eval/l0"] == ev["l0"]
    row = got["history"][16]
    assert row["eval/table/_type"] == "table-file"
    (table_file,) = offline.glob(f"wandb/offline-run-*/files/{row['eval/table/path']}")
    table = dict(json.loads(table_file.read_text())["data"])
    assert table["explained_variance"] == ev["explained_variance"] and table["n_tokens"] == ev["n_tokens"]

    # the SAE folder as a model artifact; the run id is the one kept in the run folder; a clean exit
    (model_art,) = [a for a in got["artifacts"] if a.type == "model"]
    assert model_art.name == "run-sae"
    paths = {e.path for e in model_art.manifest.contents}
    assert {"cfg.json", "sae_weights.safetensors", "eval.json"} <= paths
    assert got["run_id"] == (run_dir / RUN_ID_FILE).read_text().strip()
    assert got["exit_code"] == 0


def test_second_run_object_on_one_folder_reuses_the_wandb_run_id(tmp_path, offline):
    cfg = RunConfig.from_dict({"log": {"wandb": "p"}})
    first = WandbRun(cfg, tmp_path)
    first.log({"step": 1, "loss": 2.0})
    first.finish()
    second = WandbRun(cfg, tmp_path)  # what `--resume RUN_DIR` does
    assert second.run.id == first.run.id == (tmp_path / RUN_ID_FILE).read_text().strip()
    second.finish()


@pytest.mark.slow
def test_training_without_log_wandb_never_imports_wandb(tiny_model_dirs, text_corpus, tmp_path):
    args = tiny_train(tiny_model_dirs["gpt2"], text_corpus, tmp_path / "runs", "--no-eval", "--tokens", 1024)
    code = (
        "import sys, saeforge.training.run\n"
        "from saeforge.cli import main\n"
        f"assert main({[str(a) for a in args]!r}) == 0\n"
        "print('wandb' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "False"
    assert (tmp_path / "runs" / "run" / "sae" / "cfg.json").exists()


def test_log_section_checks_and_defaults(tmp_path, monkeypatch, capsys):
    # a config.json from before the log section loads, with wandb off
    assert RunConfig.from_dict({"train": {"lr": 1e-3}}).log == LogConfig()
    with pytest.raises(ConfigError, match="need log.wandb"):
        LogConfig(wandb_artifact=True)
    # `saeforge config` takes --log.* too, so its JSON can be a --config file
    assert main(["config", "--log.wandb", "p", "--log.wandb_artifact", "yes"]) == 0
    assert json.loads(capsys.readouterr().out)["log"] == {"wandb": "p", "wandb_entity": "", "wandb_artifact": True}
    # a sweep refuses --log.wandb before any model is loaded
    args = ["train", "--train.out_dir", tmp_path, "--sweep", "sae.k=4,8", "--log.wandb", "p", "--quiet"]
    assert main(list(map(str, args))) == 2
    assert "--sweep trains 2 SAEs together" in capsys.readouterr().err
    # without the package: a one-line user error saying what to install
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(WandbMissing, match=r"pip install 'saeforge\[wandb\]'"):
        WandbRun(RunConfig.from_dict({"log": {"wandb": "p"}}), tmp_path)
