import pytest
import torch
from test_models_train import toy_data

from clx_core import scenarios
from clx_core.config import ConfigError
from clx_core.rng import ModelStreams
from clx_core.scenarios import index_schedule


def test_split_label_tables():
    d = toy_data(classes=4)
    t = scenarios.split(d, "task", classes_per_task=2)
    assert t.n_outputs == 4 and t.heads == [(0, 2), (2, 4)]
    assert t.label_table[1, 3].item() == 3 and t.label_table[1, 0].item() == -1
    dom = scenarios.split(d, "domain", classes_per_task=2)
    assert dom.n_outputs == 2 and dom.label_table[1, 3].item() == 1 and dom.label_table[0, 0].item() == 0
    cls = scenarios.split(d, "class", classes_per_task=2)
    assert cls.n_outputs == 4 and cls.label_table[1, 2].item() == 2
    for s in (t, dom, cls):  # every task holds exactly its classes
        for k, classes in enumerate(s.task_classes):
            assert set(d.train_y[s.train_index[k]].tolist()) == set(classes)
            assert set(d.test_y[s.test_index[k]].tolist()) == set(classes)


def test_explicit_task_classes_and_shuffled_order():
    d = toy_data(classes=4)
    s = scenarios.split(d, "task", task_classes=[[3, 0], [2]])
    assert s.heads == [(0, 2), (2, 3)] and s.label_table[0, 3].item() == 0 and s.label_table[1, 2].item() == 2
    a = scenarios.split(d, "class", classes_per_task=1, class_order="shuffled", order_seed=1)
    b = scenarios.split(d, "class", classes_per_task=1, class_order="shuffled", order_seed=1)
    assert a.task_classes == b.task_classes
    orders = {
        tuple(scenarios.split(d, "class", classes_per_task=1, class_order="shuffled", order_seed=s).task_classes)
        for s in range(6)
    }
    assert len(orders) > 1


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(task_classes=[[0, 1], [1, 2]]), "must not share"),
        (dict(task_classes=[[0], []]), "at least one class"),
        (dict(task_classes=[[0, 9]]), "0..3"),
        (dict(classes_per_task=3, n_tasks=2), "'n_tasks' = 2"),
        (dict(classes_per_task=0), "'classes_per_task' = 0"),
    ],
)
def test_bad_splits_rejected(kw, match):
    with pytest.raises(ConfigError, match=match):
        scenarios.split(toy_data(classes=4), "task", **kw)


def test_unknown_scenario_rejected():
    with pytest.raises(ConfigError, match="'scenario' = 'joint'"):
        scenarios.split(toy_data(), "joint", classes_per_task=2)


def test_permuted_tasks_and_batches():
    d = toy_data(classes=4)
    p = scenarios.permuted(d, "domain", 3, seed=4, first_unpermuted=True)
    assert torch.equal(p.perms[0], torch.arange(64))
    assert not torch.equal(p.perms[1], p.perms[2])
    q = scenarios.permuted(d, "domain", 3, seed=4, first_unpermuted=True)
    assert torch.equal(p.perms, q.perms)
    idx = torch.tensor([[0, 5, 9], [1, 2, 3]])
    b = p.batch("train", 2, idx, 2)
    ref = d.train_x[idx].flatten(2)[..., p.perms[2]].view_as(b.x)
    assert torch.equal(b.x, ref)
    # the per-sample path agrees with the one-task path
    per = p.batch("train", torch.full_like(idx, 2), idx, 2)
    assert torch.equal(per.x, b.x) and torch.equal(per.y, b.y)
    task = scenarios.permuted(d, "task", 3)
    assert task.n_outputs == 12 and task.label_table[2, 1].item() == 9


def test_class_scenario_seen_outputs():
    d = toy_data(classes=4)
    s = scenarios.split(d, "class", classes_per_task=2, class_outputs="seen")
    assert s.active(0, 0).tolist() == [True, True, False, False]
    assert s.active(0, 1).all() and s.active(1, 0).all()
    assert scenarios.split(d, "class", classes_per_task=2).active(0, 0) is None


def test_index_schedule_is_epoch_wise_without_replacement():
    gens = ModelStreams([0, 1]).data
    pos = index_schedule(10, 4, 5, gens)  # two epochs of 10
    assert pos.shape == (2, 4, 5)
    for k in range(2):
        flat = pos[k].flatten()
        assert sorted(flat[:10].tolist()) == list(range(10)) and sorted(flat[10:].tolist()) == list(range(10))
    assert not torch.equal(pos[0], pos[1])
    assert torch.equal(index_schedule(10, 4, 5, ModelStreams([1]).data)[0], pos[1])
