"""The exported JSON against Neuronpedia's graph schema (its required fields and types), and the
`scalarlens graph` command end to end."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
from conftest import DISTRACTOR, TARGET, TOKENS, random_gpt2
from scalarlens.cli import main

from scalarlens_circuits import attribution_graph, prune, to_neuronpedia

# The fields of Neuronpedia's attribution-graph format that circuit-tracer's writer emits and
# Neuronpedia's graph viewer reads, with their types (metadata, qParams, nodes, links); extra
# fields are allowed there, as here.
NODE = {
    "type": "object",
    "required": [
        "node_id",
        "feature",
        "layer",
        "ctx_idx",
        "feature_type",
        "jsNodeId",
        "clerp",
        "influence",
        "activation",
        "token_prob",
        "is_target_logit",
        "run_idx",
        "reverse_ctx_idx",
    ],
    "properties": {
        "node_id": {"type": "string"},
        "feature": {"type": "integer"},
        "layer": {"type": "string"},
        "ctx_idx": {"type": "integer", "minimum": 0},
        "feature_type": {"type": "string"},
        "jsNodeId": {"type": "string"},
        "clerp": {"type": "string"},
        "influence": {"type": ["number", "null"]},
        "activation": {"type": ["number", "null"]},
        "token_prob": {"type": "number"},
        "is_target_logit": {"type": "boolean"},
        "run_idx": {"type": "integer"},
        "reverse_ctx_idx": {"type": "integer"},
    },
}
LINK = {
    "type": "object",
    "required": ["source", "target", "weight"],
    "properties": {
        "source": {"type": "string"},
        "target": {"type": "string"},
        "weight": {"type": "number"},
    },
}
SCHEMA = {
    "type": "object",
    "required": ["metadata", "qParams", "nodes", "links"],
    "properties": {
        "metadata": {
            "type": "object",
            "required": ["slug", "scan", "prompt_tokens", "prompt", "schema_version"],
            "properties": {
                "schema_version": {"type": "integer"},
                "node_threshold": {"type": ["number", "null"]},
                "transcoder_list": {"type": "array"},
                "slug": {"type": "string"},
                "scan": {"type": "string"},
                "prompt_tokens": {"type": "array", "items": {"type": "string"}},
                "prompt": {"type": "string"},
            },
        },
        "qParams": {
            "type": "object",
            "required": ["pinnedIds", "supernodes", "linkType"],
            "properties": {
                "pinnedIds": {"type": "array", "items": {"type": "string"}},
                "supernodes": {"type": "array"},
                "linkType": {"type": "string"},
            },
        },
        "nodes": {"type": "array", "items": NODE, "minItems": 1},
        "links": {"type": "array", "items": LINK},
    },
}


def test_the_json_passes_the_schema_and_links_name_nodes() -> None:
    graph = attribution_graph(
        random_gpt2(), TOKENS, target=TARGET, distractor=DISTRACTOR, max_nodes=40
    )
    prune(graph)
    data = json.loads(json.dumps(to_neuronpedia(graph, slug="tiny")))
    jsonschema.validate(data, SCHEMA)
    ids = [n["node_id"] for n in data["nodes"]]
    assert len(ids) == len(set(ids))  # ids are unique
    assert {link["source"] for link in data["links"]} | {
        link["target"] for link in data["links"]
    } <= set(ids)
    kinds = {n["feature_type"] for n in data["nodes"]}
    assert {"embedding", "logit"} <= kinds
    logit = next(n for n in data["nodes"] if n["feature_type"] == "logit")
    assert logit["node_id"] == f"4_{TARGET}_{len(TOKENS) - 1}"  # {n_layers + 1}_{token}_{pos}
    assert len(data["metadata"]["prompt_tokens"]) == len(TOKENS)


def test_the_schema_test_can_fail() -> None:
    bad = {
        "metadata": {"slug": "x", "scan": "m", "prompt_tokens": ["a"], "prompt": "a"},
        "qParams": {},
        "nodes": [{"node_id": 3}],
        "links": [],
    }
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, SCHEMA)


def test_exporting_an_unpruned_graph_says_to_prune() -> None:
    from scalarlens.exceptions import ConfigError

    graph = attribution_graph(random_gpt2(), TOKENS, target=TARGET, max_nodes=10, qk_heads=0)
    with pytest.raises(ConfigError, match="prune the graph first"):
        to_neuronpedia(graph)


def test_scalarlens_graph_writes_json_and_png(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, png = tmp_path / "g.json", tmp_path / "g.png"
    assert main(["graph", "--out", str(out), "--plot", str(png), "--max-nodes", "300"]) == 0
    captured = capsys.readouterr()
    assert "memory needed beyond the model" in captured.err
    assert "strongest path: objective" in captured.out
    data = json.loads(out.read_text())
    jsonschema.validate(data, SCHEMA)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_scalarlens_graph_rejects_a_bad_target(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = main(
        [
            "graph",
            "--prompt",
            "the old king",
            "--target",
            "notaword",
            "--out",
            str(tmp_path / "g.json"),
        ]
    )
    assert rc == 1
    assert "notaword" in capsys.readouterr().err


def test_scalarlens_graph_traces_the_top_logits_without_a_target(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "top.json"
    prompt = "the old king saw a red fox the old king saw a"
    argv = [
        "graph",
        "--prompt",
        prompt,
        "--out",
        str(out),
        "--max-nodes",
        "200",
        "--top-logits",
        "3",
    ]
    assert main(argv) == 0
    assert "tracing the top logits" in capsys.readouterr().err
    data = json.loads(out.read_text())
    jsonschema.validate(data, SCHEMA)
    logits = [n for n in data["nodes"] if n["feature_type"] == "logit"]
    assert 1 <= len(logits) <= 3 and sum(n["is_target_logit"] for n in logits) == 1


def test_scalarlens_graph_takes_a_transcoder_by_spec(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--transcoder SPEC`` is loaded by whichever plugin registers the scheme (here
    scalarlens-sae's ``transcoder-random:``): this plugin never imports it."""
    pytest.importorskip("scalarlens_sae")
    out = tmp_path / "tc.json"
    argv = [
        "graph",
        "--transcoder",
        "transcoder-random:64:1",
        "--out",
        str(out),
        "--max-nodes",
        "300",
    ]
    assert main(argv) == 0
    assert "transcoder transcoder-random:64:1: layers [0, 1]" in capsys.readouterr().err
    data = json.loads(out.read_text())
    jsonschema.validate(data, SCHEMA)
    types = {n["feature_type"] for n in data["nodes"]}
    assert "cross layer transcoder" in types and "mlp neuron" not in types
    assert main(["graph", "--transcoder", "nosuch:x", "--out", str(out)]) == 1
    assert "no plugin loads the feature dictionary 'nosuch:x'" in capsys.readouterr().err
