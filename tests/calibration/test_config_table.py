"""calibration.config.PARAMETERS: the one table behind validate_config and the options of certify and submit.

Every test iterates the table, so a new field is covered (or fails here) without new test code — except
``CLI_EXAMPLES``, which a new flag must add to (the test says so).
"""

from __future__ import annotations

import json
import re
from dataclasses import fields
from typing import Any

import click
import pytest

from calibration.config import FINETUNE_PARAMETERS, PARAMETERS, CertifyConfig, FinetuneConfig, validate_config
from calibration.errors import ConfigError
from service import cli as service_cli
from service.cli import client, offline
from service.cli.options import config_from_options

FLAGGED = [name for name, p in PARAMETERS.items() if p.flag]
BASE_CERTIFY = ["m.pt", "--data", "d.npz", "--out", "o.pt"]
BASE_SUBMIT = ["submit", "m.pt", "--data", "d.npz"]

#: per CLI-exposed field: command-line tokens and the JSON config they must mean
CLI_EXAMPLES: dict[str, tuple[list[str], dict[str, Any]]] = {
    "criterion": (["--criterion", "mu", "obd"], {"criterion": ["mu", "obd"]}),
    "scope": (["--scope", "layerwise"], {"scope": "layerwise"}),
    "risk": (["--risk", "disagreement"], {"risk": "disagreement"}),
    "epsilon": (["--epsilon", "0.02"], {"epsilon": 0.02}),
    "delta": (["--delta", "0.05"], {"delta": 0.05}),
    "sparsities": (["--sparsities", "0.1,0.2,0.3"], {"sparsities": [0.1, 0.2, 0.3]}),
    "bound": (["--bound", "wsr"], {"bound": "wsr"}),
    "procedure": (["--procedure", "planned"], {"procedure": "planned"}),
    "tune_fraction": (["--tune-fraction", "0.3"], {"tune_fraction": 0.3}),
    "seed": (["--seed", "7"], {"seed": 7}),
    "batch_size": (["--batch-size", "64"], {"batch_size": 64}),
    "device": (["--device", "cpu"], {"device": "cpu"}),
    "precision": (["--precision", "bf16"], {"precision": "bf16"}),
    "exclude_first_last": (["--exclude-first-last"], {"exclude_first_last": True}),
    "prune_include": (["--prune-include", "encoder.*", "head.weight"], {"prune_include": ["encoder.*", "head.weight"]}),
    "prune_exclude": (["--prune-exclude", "*.bias"], {"prune_exclude": ["*.bias"]}),
    "bn_recalibration": (["--no-bn-recalibration"], {"bn_recalibration": False}),
    "bn_statistics": (["--bn-statistics", "reestimate"], {"bn_statistics": "reestimate"}),
    "full_curve": (["--full-curve"], {"full_curve": True}),
    "reconstruct": (["--reconstruct"], {"reconstruct": True}),
    "finetune": (["--finetune", "30", "--finetune-lr", "0.1", "--finetune-loss", "labels"],
                 {"finetune": {"steps": 30, "lr": 0.1, "loss": "labels"}}),
    "pattern": (["--pattern", "2:4"], {"pattern": "2:4"}),
    "output": (["--output", "aux_logits"], {"output": "aux_logits"}),
}


def _certify_parser() -> click.Command:
    return offline.certify


def _submit_parser() -> click.Command:
    return client.submit


def _options(command: click.Command) -> dict[str, click.Parameter]:
    return {s: p for p in command.params for s in p.opts}


def _choices(option: click.Parameter) -> Any:
    return tuple(option.type.choices) if isinstance(option.type, click.Choice) else None


def _parse(command: click.Command, tokens: list[str]) -> dict[str, Any]:
    return service_cli.parse([command.name, *tokens])[1]


def _certify_config(tokens: list[str]) -> Any:
    return offline.certify_config(_parse(_certify_parser(), BASE_CERTIFY + tokens))


def _submit_config(tokens: list[str]) -> Any:
    from types import SimpleNamespace

    return client._build_config(SimpleNamespace(**service_cli.parse(BASE_SUBMIT + tokens)[1]))


def _error_names(name: str):
    """The message names the field (or one of its sub-fields: 'finetune.lr')."""
    return re.compile(rf"The '{re.escape(name)}(\.\w+)?' parameter must be |Unknown key")


# -- the table and the dataclasses ---------------------------------------------------------

def test_every_config_field_has_exactly_one_table_entry_with_the_dataclass_default() -> None:
    assert set(PARAMETERS) == {f.name for f in fields(CertifyConfig)}
    defaults = CertifyConfig()
    for name, param in PARAMETERS.items():
        assert param.default == getattr(defaults, name), name
        assert param.help and "\n" not in param.help, name


def test_every_finetune_field_has_exactly_one_table_entry_with_the_dataclass_default() -> None:
    assert set(FINETUNE_PARAMETERS) == {f.name for f in fields(FinetuneConfig)}
    for name, param in FINETUNE_PARAMETERS.items():
        assert param.default == getattr(FinetuneConfig(), name), name


def test_flags_are_spelled_after_their_field() -> None:
    for name, param in PARAMETERS.items():
        if param.flag is None:
            continue
        dashed = name.replace("_", "-")
        expected = f"--no-{dashed}" if param.flag_sets is False else f"--{dashed}"
        assert param.flag == expected, name


# -- validation, entry by entry ------------------------------------------------------------

@pytest.mark.parametrize("name", list(PARAMETERS))
def test_each_entry_accepts_and_converts_its_examples(name: str) -> None:
    examples = PARAMETERS[name].constraint.examples()
    assert examples, f"{name}: its constraint declares no valid example"
    for raw, cleaned in examples:
        assert getattr(validate_config({name: raw}), name) == cleaned, (name, raw)


@pytest.mark.parametrize("name", list(PARAMETERS))
def test_each_entry_refuses_its_counterexamples_with_an_error_naming_it(name: str) -> None:
    bad_values = PARAMETERS[name].constraint.counterexamples()
    assert bad_values, f"{name}: its constraint declares no invalid example"
    for bad in bad_values:
        with pytest.raises(ConfigError) as info:
            validate_config({name: bad})
        assert info.value.code == "invalid_config", (name, bad)
        assert _error_names(name).search(str(info.value)), (name, bad, str(info.value))
        assert ". Got " in str(info.value), (name, bad)


def test_validated_configs_round_trip_through_to_dict() -> None:
    for name, param in PARAMETERS.items():
        for raw, _ in param.constraint.examples():
            cfg = validate_config({name: raw})
            assert validate_config(json.loads(json.dumps(cfg.to_dict()))) == cfg, (name, raw)


@pytest.mark.parametrize("raw, message", [
    ({"epsilon": 1.5}, "The 'epsilon' parameter must be a number in the open interval (0, 1). Got 1.5."),
    ({"tune_fraction": 1}, "The 'tune_fraction' parameter must be a number in [0, 1) or null. Got 1."),
    ({"mu_lr": 10}, "The 'mu_lr' parameter must be a number in (0, 10). Got 10."),
    ({"seed": 1.5}, "The 'seed' parameter must be an integer ≥ 0. Got 1.5."),
    ({"batch_size": 0}, "The 'batch_size' parameter must be an integer in [1, 1048576]. Got 0."),
    ({"scope": "x"}, "The 'scope' parameter must be one of 'global', 'layerwise'. Got 'x'."),
    ({"risk": "x"}, "The 'risk' parameter must be one of 'accuracy_drop', 'disagreement', 'error_rate', "
                    "'token_disagreement', 'token_accuracy_drop'. Got 'x'."),
    ({"reconstruct": 1}, "The 'reconstruct' parameter must be true or false. Got 1."),
    ({"bn_recalibration": "on"}, "The 'bn_recalibration' parameter must be true, false or null. Got 'on'."),
    ({"criterion": []}, "The 'criterion' parameter must be one of ('magnitude', 'mu', 'obd', 'random') or a "
                        "non-empty list of them. Got []."),
    ({"sparsities": [0.2, 0.1]}, "The 'sparsities' parameter must be strictly increasing (sorted, no duplicates). "
                                 "Got [0.2, 0.1]. 0.1 follows 0.2."),
    ({"prune_include": []}, "The 'prune_include' parameter must be null or a non-empty list of glob patterns. "
                            "Got []. An empty list would leave nothing to prune; use null for the default weights."),
    ({"output": 64}, "The 'output' parameter must be an integer in [-64, 63]. Got 64."),
    ({"finetune": 0}, "The 'finetune' parameter must be an integer in [1, 1000000]. Got 0."),
    ({"finetune": {"lr": 0}}, "The 'finetune.lr' parameter must be a number in (0, 1] (relative: a layer's step is "
                              "lr × the RMS of its weights). Got 0."),
    ({"pattern": "2:4", "sparsities": [0.5]}, "The 'sparsities' parameter must be left at its default when "
                                              "'pattern' is set. Got [0.5]."),
])
def test_messages_keep_their_wording(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate_config(raw)
    assert str(info.value).startswith(message)


def test_an_unknown_field_is_refused_with_its_own_code_and_the_valid_names() -> None:
    with pytest.raises(ConfigError) as info:
        validate_config({"epsilonn": 0.1})
    assert info.value.code == "unknown_config_field" and "'epsilonn'" in str(info.value)
    assert all(name in str(info.value) for name in PARAMETERS)


# -- the command line: certify and submit from the same table --------------------------------

def test_every_flagged_entry_has_a_cli_example() -> None:
    assert set(CLI_EXAMPLES) == set(FLAGGED), "add the new flag to CLI_EXAMPLES"


@pytest.mark.parametrize("parser", [_certify_parser, _submit_parser], ids=["certify", "submit"])
def test_both_parsers_offer_every_flag_with_the_table_s_choices_and_help(parser) -> None:
    options = _options(parser())
    for name in FLAGGED:
        param = PARAMETERS[name]
        action = options[param.flag]
        assert action.name == name and action.help == param.help_text(), name
        assert _choices(action) == param.constraint.cli_kwargs().get("choices"), name
        for part, sub in param.constraint.parts().items():
            assert options[sub.flag].name == f"{name}_{part}" and options[sub.flag].help == sub.help_text()


@pytest.mark.parametrize("name", FLAGGED)
def test_a_flag_means_in_both_commands_what_its_json_field_means(name: str) -> None:
    tokens, as_json = CLI_EXAMPLES[name]
    for command, to_config in (("certify", _certify_config), ("submit", _submit_config)):
        from_cli = to_config(tokens)
        assert from_cli == as_json, command
        assert validate_config(from_cli) == validate_config(as_json), command
    assert validate_config(as_json) != CertifyConfig(), f"{name}: the example should change the config"


@pytest.mark.parametrize("to_config", [_certify_config, _submit_config], ids=["certify", "submit"])
def test_no_flag_leaves_the_config_empty_and_flags_override_config_json(to_config) -> None:
    assert to_config([]) == {}
    base = json.dumps({"epsilon": 0.5, "seed": 2, "full_curve": False})
    assert to_config(["--config", base, "--epsilon", "0.1", "--full-curve"]) == {
        "epsilon": 0.1, "seed": 2, "full_curve": True}


@pytest.mark.parametrize("to_config", [_certify_config, _submit_config], ids=["certify", "submit"])
def test_finetune_flags_keep_their_shapes(to_config) -> None:
    assert to_config(["--finetune"]) == {"finetune": {}}
    assert to_config(["--finetune", "30"]) == {"finetune": {"steps": 30}}
    assert to_config(["--finetune-lr", "0.1"]) == {"finetune": {"lr": 0.1}}  # a part alone switches it on
    assert validate_config(to_config(["--finetune"])).finetune == FinetuneConfig()


@pytest.mark.parametrize("to_config", [_certify_config, _submit_config], ids=["certify", "submit"])
def test_criteria_may_be_space_or_comma_separated(to_config) -> None:
    assert to_config(["--criterion", "mu,obd", "random"]) == {"criterion": ["mu", "obd", "random"]}


@pytest.mark.parametrize("parser", [_certify_parser, _submit_parser], ids=["certify", "submit"])
@pytest.mark.parametrize("tokens", [["--criterion", "l1"], ["--scope", "x"], ["--device", "tpu"],
                                    ["--precision", "fp8"], ["--finetune-loss", "mse"], ["--epsilon", "x"]])
def test_both_parsers_refuse_values_outside_the_choices(parser, tokens: list[str], capsys) -> None:
    base = BASE_CERTIFY if parser is _certify_parser else BASE_SUBMIT[1:]
    with pytest.raises(SystemExit):
        _parse(parser(), base + tokens)
    assert tokens[0] in capsys.readouterr().err


def test_bad_sparsities_text_is_refused_by_name() -> None:
    with pytest.raises(SystemExit, match="--sparsities must be comma-separated numbers"):
        _certify_config(["--sparsities", "0.1,x"])


def test_config_object_must_be_an_object_even_with_flags() -> None:
    args = _parse(_certify_parser(), BASE_CERTIFY + ["--epsilon", "0.1"])
    with pytest.raises(ConfigError, match="must be a JSON object"):
        validate_config(config_from_options(args, [1, 2]))


def test_help_lists_the_fields_without_a_flag() -> None:
    text = _certify_parser().get_help(click.Context(_certify_parser(), info_name="certiprune certify"))
    for name, param in PARAMETERS.items():
        assert (param.flag or f"  {name}:") in text, name
