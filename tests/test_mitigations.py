import torch

from overtrain.train.loop import TrainConfig, train
from overtrain.train.mitigations import interpolated, with_lora, with_replay
from overtrain.train.schedules import Schedule


def state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def finetune(model, corpus, steps=5, **options):
    config = TrainConfig(steps=steps, schedule=Schedule("constant", 3e-3, steps), **options)
    return train(model, corpus.train_batches(4, 64, seed=1), config)


def test_wise_ft_interpolates_and_restores_exactly(tiny_model, byte_corpus):
    pretrained = state(tiny_model)
    finetune(tiny_model, byte_corpus)
    finetuned = state(tiny_model)
    for alpha in (0.0, 0.5, 1.0):
        with interpolated(tiny_model, pretrained, alpha):
            for name, param in tiny_model.named_parameters():
                expected = pretrained[name] + alpha * (finetuned[name] - pretrained[name])
                assert torch.allclose(param, expected, atol=1e-7), (alpha, name)
    assert all(torch.equal(p, finetuned[n]) for n, p in tiny_model.named_parameters())


def test_replay_swaps_a_fraction_of_rows_for_pretraining_text(byte_corpus):
    task = ({"input_ids": torch.full((8, 20), 5), "labels": torch.full((8, 20), 5)} for _ in range(3))
    mixed = list(with_replay(task, byte_corpus.train_batches(8, 64, seed=0), fraction=0.25, pad_id=0))
    assert len(mixed) == 3
    for batch in mixed:
        assert batch["input_ids"].shape == (8, 20)
        replayed = (batch["input_ids"] != 5).any(dim=1)
        assert replayed.sum() == 2 and replayed[-2:].all()


def test_lora_trains_adapters_and_leaves_base_weights(tiny_model, byte_corpus):
    before = state(tiny_model)
    lora = with_lora(tiny_model, rank=2)
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    finetune(lora, byte_corpus)
    base = {n.replace("base_model.model.", "").replace(".base_layer", ""): p for n, p in lora.named_parameters() if "lora_" not in n}
    assert all(torch.equal(base[n], before[n]) for n in before)
    merged = lora.merge_and_unload()
    assert not torch.equal(merged.model.layers[0].self_attn.q_proj.weight, before["model.layers.0.self_attn.q_proj.weight"])


def test_sam_takes_the_gradient_at_the_ascent_point(tiny_model, byte_corpus):
    """One SAM step equals a plain AdamW step whose gradient is taken at theta + rho g/|g|."""
    import copy

    from overtrain.train.loop import make_optimizer

    rho = 0.05
    batch = next(byte_corpus.train_batches(4, 64, seed=1))
    twin = copy.deepcopy(tiny_model)
    finetune(tiny_model, byte_corpus, steps=1, sam_rho=rho, grad_clip=0.0)

    params = list(twin.parameters())
    grads = torch.autograd.grad(twin(**batch).loss, params)
    scale = rho / torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
    with torch.no_grad():
        for p, g in zip(params, grads):
            p.add_(g * scale)
    ascent_grads = torch.autograd.grad(twin(**batch).loss, params)
    with torch.no_grad():
        for p, g in zip(params, grads):
            p.sub_(g * scale)
    optimizer = make_optimizer(twin, TrainConfig(steps=1, schedule=Schedule("constant", 3e-3, 1)))
    for p, g in zip(params, ascent_grads):
        p.grad = g
    optimizer.step()
    for ours, reference in zip(tiny_model.parameters(), params):
        assert torch.allclose(ours, reference, atol=1e-6)
