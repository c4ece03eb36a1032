"""The command line: options, saved configurations and path checks (no processing)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from spineqprep.cli.parser import parse_args
from spineqprep.cli.run import check_paths, main
from spineqprep.config import RunConfig, load_toml
from spineqprep.errors import UsageError


@pytest.fixture
def raw(tmp_path: Path) -> Path:
    bids = tmp_path / "bids"
    bids.mkdir()
    (bids / "dataset_description.json").write_text('{"Name": "x", "BIDSVersion": "1.10.1"}')
    return bids


def test_options_reach_the_config(raw: Path, tmp_path: Path) -> None:
    filt = tmp_path / "filter.json"
    filt.write_text(json.dumps({"MESL": {"acq": "mapss"}}))
    cfg = parse_args([
        str(raw), str(tmp_path / "out"), "participant", "--participant-label", "sub-01", "02",
        "--session-label", "ses-A", "-w", str(tmp_path / "w"), "--nprocs", "2",
        "--omp-nthreads", "1", "--mem-mb", "4000", "--bids-filter-file", str(filt),
        "--random-seed", "7", "--stop-on-first-crash", "--fit-model", "offset", "-vv",
    ])
    assert cfg.participant_label == ["01", "02"]
    assert cfg.session_label == ["A"]
    assert cfg.work_dir == (tmp_path / "w").resolve()
    assert (cfg.nprocs, cfg.omp_nthreads, cfg.mem_mb, cfg.random_seed) == (2, 1, 4000, 7)
    assert cfg.bids_filters == {"MESL": {"acq": "mapss"}}
    assert cfg.stop_on_first_crash and cfg.fit_model == "offset" and cfg.verbosity == 2


def test_config_file_replays_a_run_and_command_line_wins(raw: Path, tmp_path: Path) -> None:
    first = parse_args([str(raw), str(tmp_path / "out"), "participant", "--nprocs", "2",
                        "--omp-nthreads", "2", "--random-seed", "11", "--fit-model", "offset"])
    saved = first.save(tmp_path / "log" / "spineqprep.toml")
    assert load_toml(saved)["random_seed"] == 11
    again = parse_args([str(raw), str(tmp_path / "out"), "participant", "--config-file",
                        str(saved), "--omp-nthreads", "1"])
    assert again.random_seed == 11 and again.fit_model == "offset"
    assert again.omp_nthreads == 1
    assert again.run_uuid != first.run_uuid


@pytest.mark.parametrize("content, message", [
    ("not toml [", "not a valid TOML"),
    ("[other]\na = 1\n", r"no \[spineqprep\] table"),
    ("[spineqprep]\nbogus = 1\n", "unknown settings"),
])
def test_bad_config_file(raw: Path, tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(content)
    with pytest.raises(UsageError, match=message):
        parse_args([str(raw), str(tmp_path / "o"), "participant", "--config-file", str(path)])


def test_plugin_settings_file(raw: Path, tmp_path: Path) -> None:
    path = tmp_path / "plugin.yml"
    path.write_text("plugin: SLURMGraph\nplugin_args:\n  sbatch_args: '--time=01:00:00'\n")
    cfg = parse_args([str(raw), str(tmp_path / "o"), "participant", "--plugin-settings",
                      str(path)])
    assert cfg.plugin == "SLURMGraph"
    assert cfg.plugin_args == {"sbatch_args": "--time=01:00:00"}


@pytest.mark.parametrize("where", ["inside", "same", "parent"])
def test_output_or_work_dir_around_raw_is_refused(raw: Path, where: str) -> None:
    target = {"inside": raw / "derivatives" / "spineqprep", "same": raw, "parent": raw.parent}
    cfg = RunConfig(bids_dir=raw, output_dir=target[where], analysis_level="participant",
                    work_dir=raw.parent / "work")
    with pytest.raises(UsageError, match="raw dataset"):
        check_paths(cfg)
    cfg = RunConfig(bids_dir=raw, output_dir=raw.parent / "out", analysis_level="participant",
                    work_dir=raw / "work")
    with pytest.raises(UsageError, match="work folder is inside"):
        check_paths(cfg)


def test_errors_are_one_message_and_nonzero_exit(raw: Path, tmp_path: Path, capsys) -> None:
    code = main([str(raw), str(raw / "out"), "participant"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("spineqprep: error:") and "Traceback" not in err
    assert not (raw / "out").exists()
    code = main([str(tmp_path / "missing"), str(tmp_path / "out"), "participant"])
    assert code == 2 and "does not exist" in capsys.readouterr().err


def test_omp_threads_cannot_exceed_nprocs(raw: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="omp-nthreads"):
        parse_args([str(raw), str(tmp_path / "o"), "participant", "--nprocs", "1",
                    "--omp-nthreads", "2"])


def test_cutoffs_per_structure(raw: Path, tmp_path: Path) -> None:
    config = parse_args([str(raw), str(tmp_path / "out"), "participant", "--cutoff",
                         "disc=0.4", "--cutoff", "L5S1_inferior=0.3"])
    assert config.cutoffs == {"disc": 0.4, "L5S1_inferior": 0.3}
    for bad, message in (("nucleus=0.5", "unknown structure"), ("disc=high", "not a number"),
                         ("disc=1.5", "between 0 and 1")):
        with pytest.raises(UsageError, match=message):
            parse_args([str(raw), str(tmp_path / "out"), "participant", "--cutoff", bad])


PACKAGED = Path(__file__).resolve().parents[1] / "spineqprep" / "data"


@pytest.mark.parametrize("args, words", [
    (["--seg-weights", "/nonexistent"], ["--seg-weights", "/nonexistent", "no such bundle"]),
    (["--cep-weights", "/nonexistent"], ["--cep-weights", "/nonexistent", "no such bundle"]),
    (["--seg-weights", str(PACKAGED / "models" / "endplates")],
     ["--seg-weights", "'endplates' network", "--cep-weights"]),
    (["--cep-weights", str(PACKAGED / "models" / "spine")],
     ["--cep-weights", "'spine' network", "--seg-weights"]),
    (["--atlas", "/nonexistent"], ["--atlas", "/nonexistent", "does not exist"]),
    (["--registration-params", "/nonexistent.txt"],
     ["--registration-params", "/nonexistent.txt", "not found"]),
    (["--registration-backend", "ants", "--registration-params",
      str(PACKAGED / "registration" / "elastix_affine.txt")],
     ["--registration-params", "backend 'ants' takes none"]),
])
def test_wrong_models_atlas_or_registration_files_stop_before_any_work(
        raw: Path, tmp_path: Path, capsys, args: list[str], words: list[str]) -> None:
    """A wrong --seg-weights / --cep-weights / --atlas / --registration-params is refused when
    the command line is read: one message naming the option, the file and the fix, exit 2, no
    output written (inside the workflow it failed every subject after fitting its maps)."""
    code = main([str(raw), str(tmp_path / "out"), "participant", "-w", str(tmp_path / "w"),
                 *args])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "fix:" in err
    assert all(word in err for word in words), err
    assert not (tmp_path / "out").exists()


def test_options_of_skipped_steps_are_not_checked(raw: Path, tmp_path: Path) -> None:
    """--atlas is only read by the registration and the bundles only by the segmentation."""
    from spineqprep.cli.run import check_options

    check_options(parse_args([str(raw), str(tmp_path / "o"), "participant", "--no-registration",
                              "--atlas", "/nonexistent"]))
    check_options(parse_args([str(raw), str(tmp_path / "o"), "participant",
                              "--no-segmentation", "--seg-weights", "/nonexistent"]))
    check_options(parse_args([str(raw), str(tmp_path / "o"), "participant"]))  # the packaged
