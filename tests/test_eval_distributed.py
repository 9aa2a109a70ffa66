"""Two gloo ranks give the results of one process: plain, sliding and TTT (windows, TTT sequences and gradients
split across ranks; one flat gradient all-reduce)."""
import math
import os

import torch
import torch.multiprocessing as mp

from eval_helpers import gloo_group, make_ctx, make_model, smoke_hp, smoke_stream, tg

EVALS = {"plain": tg.eval_val, "sliding": tg.eval_val_sliding, "ttt": tg.eval_val_ttt}
N_TARGETS = 2100  # 3 TTT chunks, 2 of them trained on; 2100 / 128 is not whole, so a rank gets a partial block


def _worker(rank: int, world_size: int, data: tuple[str, str], out_dir: str) -> None:
    with gloo_group(rank, world_size, out_dir):
        hp = smoke_hp()
        tokens, tables = smoke_stream(data, hp, N_TARGETS)
        state = torch.load(os.path.join(out_dir, "model.pt"))
        results = {}
        for name, evaluate in EVALS.items():
            model = make_model(hp)
            model.load_state_dict(state)
            results[name] = evaluate(model, tokens, tables, hp, make_ctx(rank=rank, world_size=world_size),
                                     return_losses=True)
        if rank == 0:
            torch.save(results, os.path.join(out_dir, "results.pt"))


def test_two_ranks_match_one_process(smoke_data, tmp_path):
    hp = smoke_hp()
    tokens, tables = smoke_stream(smoke_data, hp, N_TARGETS)
    model = make_model(hp)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    mp.spawn(_worker, args=(2, smoke_data, str(tmp_path)), nprocs=2, join=True)
    two = torch.load(tmp_path / "results.pt", weights_only=False)
    for name, evaluate in EVALS.items():
        single = make_model(hp)
        single.load_state_dict(model.state_dict())
        one = evaluate(single, tokens, tables, hp, make_ctx(), return_losses=True)
        assert two[name].covered and one.covered
        assert (two[name].tokens, two[name].bytes) == (one.tokens, one.bytes)
        if name == "ttt":  # gradients are summed in another order across ranks: equal up to float rounding
            torch.testing.assert_close(two[name].target_losses, one.target_losses, rtol=1e-5, atol=1e-5)
            assert math.isclose(two[name].val_bpb, one.val_bpb, rel_tol=1e-6)
        else:  # every window sees the same rows on either side: exactly the same losses
            assert torch.equal(two[name].target_losses, one.target_losses)
            assert math.isclose(two[name].val_bpb, one.val_bpb, rel_tol=1e-12)
