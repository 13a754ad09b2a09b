"""convert on real third-party models: Hugging Face transformers built from small configs
(no download). Like-for-like conversion leaves the outputs unchanged.

transformers is in the test extra; a missing install fails here, it is not skipped.
"""

import copy

import torch
import transformers
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

import normlab
from normlab.convert import is_norm


def _llama():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        rms_norm_eps=1e-5,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # non-trivial γ, so that carrying it shows
        for m in model.modules():
            if type(m).__name__ == "LlamaRMSNorm":
                m.weight.uniform_(0.5, 1.5)
    return model


def _bert():
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    model = BertModel(config).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model


def test_llama_rms_norms_are_recognised_and_carried():
    model = _llama()
    rms = transformers.models.llama.modeling_llama.LlamaRMSNorm
    found = [n for n, m in model.named_modules() if isinstance(m, rms)]
    assert found and found == [n for n, m in model.named_modules() if is_norm(m)]
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    expected = model(ids).logits
    weights = {n: m.weight.clone() for n, m in model.named_modules() if isinstance(m, rms)}
    model, report = normlab.convert(model, "rms")
    assert [r.name for r in report.replaced] == found
    for name, weight in weights.items():
        layer = model.get_submodule(name)
        assert type(layer) is normlab.RMSNorm and layer.channel_axis == -1
        assert layer.eps == 1e-5
        torch.testing.assert_close(layer.weight, weight)
    torch.testing.assert_close(model(ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_bert_layer_norms_convert_to_per_token_layer_norms():
    model = _bert()
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    expected = model(ids).last_hidden_state
    converted, report = normlab.convert(copy.deepcopy(model), "ln")
    assert len(report) == 5 and not report.not_carried
    assert all(type(m) is normlab.LayerNorm for m in converted.modules() if is_norm(m))
    assert all(m.eps == 1e-12 for m in converted.modules() if is_norm(m))
    torch.testing.assert_close(converted(ids).last_hidden_state, expected, rtol=1e-5, atol=1e-5)
