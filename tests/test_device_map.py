"""Big models across devices: a model placed with a ``device_map`` (some layers on the CPU, some
offloaded to disk) gives the same logits, lens, saliency and flow graph as the same model in memory.

Offloaded weights are ``meta`` placeholders between forward passes; these tests check that the
placement really offloaded them, and that the analyses read the real values (the flow graph's
``W_O``/``W_down`` and biases, the lens's final norm and unembedding).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import lmscope
from conftest import tiny
from lmscope.cli import main
from lmscope.errors import LmscopeError

TEXT = "The keys to the cabinet"


def half_on_disk(lm: lmscope.LM) -> dict[str, str]:
    """A device_map: the first half of the blocks on the CPU, the rest, the final norm and the head on disk.

    A head tied to the input embeddings stays with them (transformers loads a tied weight once).
    """
    names = {id(module): name for name, module in lm.model.named_modules()}
    blocks = [names[id(block)] for block in lm.arch.blocks]
    disk = set(blocks[len(blocks) // 2 :])
    head, embed = lm.model.get_output_embeddings(), lm.model.get_input_embeddings()
    if head.weight is not embed.weight:
        disk.add(names[id(head)])
    if lm.arch.final_norm is not None:
        disk.add(names[id(lm.arch.final_norm)])
    device_map = {block: "disk" if block in disk else "cpu" for block in blocks}
    for name in lm.model.state_dict():  # tied weights (GPT-2's head) included
        owner = name.rpartition(".")[0]
        if not any(owner == key or owner.startswith(f"{key}.") for key in device_map):
            device_map[owner] = "disk" if owner in disk else "cpu"
    return device_map


def _offloaded(lm: lmscope.LM) -> list[str]:
    return [name for name, p in lm.model.named_parameters() if p.device.type == "meta"]


def _same(reference: lmscope.LM, placed: lmscope.LM, atol: float = 1e-5, saliency: bool = True) -> None:
    a, b = reference.trace(TEXT), placed.trace(TEXT)
    assert all(t.device.type == "cpu" for t in b.trace.tensors.values())  # one capture device
    torch.testing.assert_close(b.logits, a.logits, atol=atol, rtol=0)
    la, lb = a.layer_predictions(position=-1, topk=5), b.layer_predictions(position=-1, topk=5)
    assert lb.tokens == la.tokens
    np.testing.assert_allclose(np.asarray(lb.probs), np.asarray(la.probs), atol=atol)
    sa, sb = (a.primary_attributions(), b.primary_attributions()) if saliency else ((), ())
    for x, y in zip(getattr(sa, "attributions", ()), getattr(sb, "attributions", ()), strict=True):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=atol)
    fa, fb = a.flow(), b.flow()
    key = [(e.kind, e.layer, e.source.pos, e.target.pos) for e in fa.edges]
    assert [(e.kind, e.layer, e.source.pos, e.target.pos) for e in fb.edges] == key
    np.testing.assert_allclose([e.weight for e in fb.edges], [e.weight for e in fa.edges], atol=atol)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt-neox"])  # GQA; tied Conv1D head; parallel blocks
def test_tiny_families_offloaded_to_cpu_and_disk_equal_in_memory(family, tmp_path):
    reference = tiny(family)
    device_map = half_on_disk(reference)
    placed = lmscope.from_pretrained(f"tiny-{family}", device_map=device_map, offload_folder=tmp_path)
    assert "disk" in placed.model.hf_device_map.values() and "cpu" in placed.model.hf_device_map.values()
    assert _offloaded(placed), "nothing was offloaded"
    assert any(tmp_path.iterdir()), "nothing was written to the offload folder"
    _same(reference, placed, saliency=family != "gpt-neox")
    assert _offloaded(placed), "an analysis left offloaded weights loaded"


def test_auto_placement_bounded_by_max_memory(tmp_path):
    reference = lmscope.from_pretrained("tiny-llama")
    embed = sum(p.numel() * p.element_size() for p in reference.model.get_input_embeddings().parameters())
    placed = lmscope.from_pretrained("tiny-llama", device_map="auto", max_memory={"cpu": 2 * embed},
                                     offload_folder=tmp_path)  # fmt: skip
    assert set(placed.model.hf_device_map.values()) == {"cpu", "disk"}
    _same(reference, placed, saliency=False)


@pytest.mark.embedded
def test_embedded_model_half_the_layers_on_disk(embedded, tmp_path):
    reference = embedded
    placed = lmscope.from_pretrained(device_map=half_on_disk(reference), offload_folder=tmp_path)
    assert len(_offloaded(placed)) > 100  # 15 of 30 blocks and the final norm
    _same(reference, placed, atol=2e-5, saliency=False)  # saliency across devices: the tiny families


def test_verify_passes_on_a_placed_model(tmp_path):
    reference = lmscope.from_pretrained("tiny-llama")
    placed = lmscope.from_pretrained("tiny-llama", device_map=half_on_disk(reference), offload_folder=tmp_path)
    report = lmscope.verify(placed)
    assert report.passed, report.failed


def _one_line(error: pytest.ExceptionInfo[LmscopeError]) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_max_memory_below_one_layer_is_one_clear_line(tmp_path):
    for name in ("tiny-llama", None):  # an in-memory model placed by lmscope; one transformers places
        with pytest.raises(LmscopeError) as error:
            lmscope.from_pretrained(name, device_map="auto", max_memory={"cpu": "1KB"}, offload_folder=tmp_path)
        assert "too small to hold one layer" in _one_line(error)


def test_offload_folder_not_writable_is_one_clear_line(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for folder in (blocker, blocker / "offload"):
        for name in ("tiny-llama", None):
            with pytest.raises(LmscopeError) as error:
                lmscope.from_pretrained(name, device_map={"": "cpu"}, offload_folder=folder)
            assert "is not a writable folder" in _one_line(error)


def test_other_bad_placements_are_one_clear_line(tmp_path):
    with pytest.raises(LmscopeError) as error:
        lmscope.from_pretrained("tiny-llama", device_map={"": "disk"})
    assert "offload_folder" in _one_line(error)
    with pytest.raises(LmscopeError) as error:
        lmscope.from_pretrained("tiny-llama", max_memory={"cpu": "1GB"})
    assert "need a device_map" in _one_line(error)
    with pytest.raises(LmscopeError) as error:
        lmscope.from_pretrained("tiny-llama", device_map="everywhere")
    assert "not a placement" in _one_line(error)
    with pytest.raises(LmscopeError) as error:
        lmscope.from_pretrained("tiny-llama", device_map={"model.nowhere": "cpu"}, offload_folder=tmp_path)
    assert "does not have" in _one_line(error)


def test_command_line_places_a_model_and_verifies_it(tmp_path, capsys):
    small = ["verify", "tiny-llama", "--device-map", "auto", "--device-memory", "cpu=1KB", "--offload-folder",
             str(tmp_path)]  # fmt: skip
    assert main(small) != 0
    error = capsys.readouterr().err
    assert "too small to hold one layer" in error and "Traceback" not in error
    assert main([*small[:5], "cpu=1MB", *small[6:], "--json", "--generate", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["passed"] is True
