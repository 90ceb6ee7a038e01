"""Config: precedence, types, ranges, consistency, and every user-error path (one line, exit code 2)."""

from __future__ import annotations

import pytest
import yaml

from disttrain.cli.main import main
from disttrain.config import Config, ConfigError, check_world_size
from disttrain.config import config_from_dict, load_config, reference_table


def write(tmp_path, text: str, name: str = "c.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_match_the_documented_keys():
    cfg = load_config(None)
    assert cfg.seed == 0
    assert (cfg.data.name, cfg.data.num_samples) == ("synthetic", 512)
    assert (cfg.model.name, cfg.model.norm) == ("mlp", "none")
    o = cfg.optim
    assert (o.name, o.lr, o.momentum, o.weight_decay, o.nesterov) == ("sgd", 0.1, 0.9, 1e-4, False)
    assert (cfg.comm.reduce, cfg.comm.impl) == ("mean", "ddp")
    t = cfg.train
    assert (t.global_batch_size, t.steps, t.dtype, t.device, t.out_dir, t.log_every) == (
        32, 20, "float32", "auto", "runs/demo", 1)


def test_precedence_defaults_yaml_overrides(tmp_path):
    path = write(tmp_path, "optim: {lr: 0.5, momentum: 0.0}\ntrain: {steps: 7}\n")
    cfg = load_config(path, ["optim.lr=0.25", "train.dtype=float64", "seed=3"])
    assert cfg.optim.lr == 0.25  # --set beats YAML
    assert cfg.optim.momentum == 0.0  # YAML beats default
    assert cfg.optim.weight_decay == 1e-4  # default
    assert (cfg.train.steps, cfg.train.dtype, cfg.seed) == (7, "float64", 3)
    assert cfg.optim.betas == [0.9, 0.999]


def test_override_parses_yaml_values(tmp_path):
    cfg = load_config(None, ["optim.nesterov=true", "optim.betas=[0.8, 0.9]", "train.out_dir=x/y"])
    assert cfg.optim.nesterov is True and cfg.optim.betas == [0.8, 0.9] and cfg.train.out_dir == "x/y"


def test_exponent_literals_are_numbers(tmp_path):
    # YAML 1.1 (PyYAML) reads 1e-3 as a string; a float key must still take it.
    cfg = load_config(write(tmp_path, "optim: {lr: 1e-3, eps: 1E-8}\n"), ["optim.weight_decay=5e-4"])
    assert (cfg.optim.lr, cfg.optim.eps, cfg.optim.weight_decay) == (1e-3, 1e-8, 5e-4)
    with pytest.raises(ConfigError, match=r"optim\.lr: expected a number, got '1e-3x'"):
        load_config(None, ["optim.lr=1e-3x"])


def test_int_accepted_for_float_and_round_trip():
    cfg = load_config(None, ["optim.lr=1"])
    assert isinstance(cfg.optim.lr, float)
    assert config_from_dict(cfg.to_dict()) == cfg
    assert config_from_dict(yaml.safe_load(cfg.to_yaml())) == cfg


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=0.1", r"unknown key optim\.lrr \(allowed in optim: name, lr, momentum"),
    ("bogus=1", r"unknown key bogus \(allowed in config: seed, data, model"),
    ("train.steps=ten", r"train\.steps: expected an integer, got 'ten'"),
    ("train.steps=2.5", r"train\.steps: expected an integer, got 2\.5"),
    ("train.steps=true", r"train\.steps: expected an integer, got True"),
    ("optim.lr=fast", r"optim\.lr: expected a number, got 'fast'"),
    ("optim.nesterov=1", r"optim\.nesterov: expected true or false, got 1"),
    ("optim.betas=0.9", r"optim\.betas: expected a list of float, got 0\.9"),
    ("optim.name=lamb", r"optim\.name: 'lamb' is not one of sgd, adamw"),
    ("comm.reduce=median", r"comm\.reduce: 'median' is not one of mean, sum, max, avg"),
    ("train.dtype=float16", r"train\.dtype: 'float16' is not one of float32, float64"),
    ("optim.lr=0", r"optim\.lr: must be > 0, got 0\.0"),
    ("optim.momentum=1.0", r"optim\.momentum: must be in \[0, 1\), got 1\.0"),
    ("optim.weight_decay=-1", r"optim\.weight_decay: must be >= 0"),
    ("optim.betas=[0.9]", r"optim\.betas: must be two numbers in \[0, 1\)"),
    ("train.global_batch_size=0", r"train\.global_batch_size: must be >= 1, got 0"),
    ("train.global_batch_size=1000", r"train\.global_batch_size: 1000 exceeds data\.num_samples=512"),
    ("train.steps=0", r"train\.steps: must be >= 1, got 0"),
    ("train.log_every=0", r"train\.log_every: must be >= 1"),
    ("comm.timeout_s=0", r"comm\.timeout_s: must be > 0"),
    ("comm.bucket_mb=-1", r"comm\.bucket_mb: must be > 0"),
    ("data.num_samples=0", r"data\.num_samples: must be >= 1, got 0"),
    ("model.norm=groupnorm", r"model\.norm: 'groupnorm' is not one of none, bn, syncbn"),
    ("optim=3", r"optim: expected a mapping of keys, got 3"),
    ("nokey", r"--set 'nokey': expected section\.key=value"),
    ("seed.x=1", r"seed: expected an integer, got \{'x': 1\}"),
    ("train.steps.x=1", r"train\.steps: expected an integer, got \{'x': 1\}"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_inconsistent_combinations():
    with pytest.raises(ConfigError, match=r"optim\.nesterov: true needs optim\.name=sgd and optim\.momentum > 0"):
        load_config(None, ["optim.nesterov=true", "optim.momentum=0"])
    with pytest.raises(ConfigError, match=r"optim\.nesterov"):
        load_config(None, ["optim.nesterov=true", "optim.name=adamw"])
    with pytest.raises(ConfigError, match=r"data\.num_samples: 5000 exceeds the 1797 samples of the digits dataset"):
        load_config(None, ["data.name=digits", "data.num_samples=5000", "train.global_batch_size=8"])


def test_world_size_split():
    cfg = load_config(None, ["train.global_batch_size=3"])
    check_world_size(cfg, 3)
    with pytest.raises(ConfigError, match=r"train\.global_batch_size=3 cannot be split over world size 4: "
                                          r"every rank needs at least one sample"):
        check_world_size(cfg, 4)


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"config file not found: .*missing\.yaml"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match=r"c\.yaml: invalid YAML \(line \d+, column \d+\): expected ','"):
        load_config(write(tmp_path, "train:\n  steps: [1, 2\n"))
    with pytest.raises(ConfigError, match=r"the top level must be a mapping of sections, got list"):
        load_config(write(tmp_path, "- 1\n- 2\n"))
    assert load_config(write(tmp_path, "")) == Config()  # an empty file means all defaults


@pytest.mark.parametrize("text, override, message", [
    ("train: {stepz: 3}\n", [], "unknown key train.stepz"),
    ("train: {steps: 3\n", [], "invalid YAML"),
    ("", ["optim.lr=-1"], "optim.lr: must be > 0"),
    ("", ["nonsense"], "expected section.key=value"),
    ("", ["train.global_batch_size=600"], "exceeds data.num_samples"),
])
def test_cli_user_errors_are_one_line_exit_2(tmp_path, capsys, text, override, message):
    path = write(tmp_path, text)
    args = ["train", str(path)] + [a for o in override for a in ("--set", o)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("disttrain: error: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_cli_missing_file_and_impossible_split(tmp_path, capsys):
    assert main(["verify", str(tmp_path / "nope.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    path = write(tmp_path, "train: {global_batch_size: 2}\n")
    assert main(["train", str(path), "--nproc", "3"]) == 2
    assert "cannot be split over world size 3" in capsys.readouterr().err
    assert main(["verify", str(path), "--nproc", "0"]) == 2
    assert "--nproc: must be >= 1, got 0" in capsys.readouterr().err


def test_cli_unusable_out_dir(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert main(["train", str(write(tmp_path, "")), "--set", f"train.out_dir={blocker}/run"]) == 2
    assert capsys.readouterr().err == f"disttrain: error: train.out_dir: cannot create {blocker}/run: Not a directory\n"


def test_cli_refuses_nproc_and_verify_under_torchrun(tmp_path, capsys, monkeypatch):
    path = write(tmp_path, "")
    for var, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(var, value)
    assert main(["train", str(path), "--nproc", "2"]) == 2
    assert "--nproc cannot be used under torchrun" in capsys.readouterr().err
    assert main(["verify", str(path)]) == 2
    assert "verify starts its own workers" in capsys.readouterr().err


def test_cli_unknown_command_and_missing_argument(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["fly"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["train"])
    assert exc.value.code == 2


def test_cli_config_prints_resolved_yaml(tmp_path, capsys):
    assert main(["config", str(write(tmp_path, "seed: 4\n")), "--set", "optim.lr=0.3"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["seed"] == 4 and resolved["optim"]["lr"] == 0.3 and resolved["train"]["steps"] == 20


def test_readme_documents_every_key():
    """Every key is named in the README or in a topic page of docs/."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    text = "\n".join(p.read_text() for p in [root / "README.md", *sorted((root / "docs").glob("*.md"))])
    missing = [key for key, *_ in reference_table() if f"`{key}`" not in text]
    assert not missing, f"README config reference lacks {missing}"


def test_a_key_a_run_predates_counts_as_its_default():
    """Checkpoints and runs written before a config key existed compare as if they had its default."""
    from disttrain.config.identity import trajectory_differences

    ours = load_config(None, []).to_dict()
    older = {section: dict(v) if isinstance(v, dict) else v for section, v in ours.items()}
    del older["train"]["precision"], older["data"]["path"]
    assert trajectory_differences(ours, older) == []
    assert trajectory_differences(load_config(None, ["train.precision=bf16"]).to_dict(), older) == ["train.precision"]


def test_fp16_with_fsdp_is_refused():
    with pytest.raises(ConfigError, match=r"^train\.precision=fp16 with comm\.impl=fsdp: the loss scaler decides"):
        load_config(None, ["train.precision=fp16", "comm.impl=fsdp"])
