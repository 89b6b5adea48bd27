"""Training loops written as users write them, to fingerprint with loop=custom:

    python -m runner -m experiment=fingerprint loop=custom loop._target_=runner.experiments.examples.loops.nanogpt

Each is called as train(model, optimizer, loader, loss_fn, *, epochs, accumulation, scheduler=None,
clip_norm=0.0); `loader` yields (inputs, targets) micro-batches and has a len. The lab knows nothing of
them: it hooks the model's forward and the optimizer's step and names what it sees.
"""
import torch


def nanogpt(model, optimizer, loader, loss_fn, *, epochs, accumulation, scheduler=None, clip_norm=0.0):
    """nanoGPT's train.py: each micro-batch's mean loss / k; a step every k micro-batches and at an epoch's end."""
    for _ in range(epochs):
        for i, (x, y) in enumerate(loader):
            (loss_fn(model(x), y) / accumulation).backward()
            if (i + 1) % accumulation == 0 or i + 1 == len(loader):
                if clip_norm:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
                optimizer.step()
                optimizer.zero_grad()
                if scheduler is not None:
                    scheduler.step()


def _rows(targets):
    """A micro-batch's rows: its targets may be a dict of tensors (rollouts, packed rows)."""
    return len(next(iter(targets.values()))) if isinstance(targets, dict) else len(targets)


def _windows(loader, accumulation):
    """The epoch's windows of k micro-batches (the last may hold fewer)."""
    batches = list(loader)
    return [batches[i:i + accumulation] for i in range(0, len(batches), accumulation)]


def exact(model, optimizer, loader, loss_fn, *, epochs, accumulation, scheduler=None, clip_norm=0.0):
    """The exact fix: each micro-batch's loss weighted by its share of the window's rows, or handed the
    window's token count (num_items_in_batch) where the loss counts tokens."""
    tokens = hasattr(loss_fn, "count_tokens")
    for _ in range(epochs):
        for window in _windows(loader, accumulation):
            total = sum(int(loss_fn.count_tokens(y)) if tokens else _rows(y) for _, y in window)
            for x, y in window:
                if tokens:
                    loss = loss_fn(model(x), y, num_items_in_batch=total)
                else:
                    loss = loss_fn(model(x), y) * _rows(y) / total
                loss.backward()
            if clip_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
            optimizer.step()
            optimizer.zero_grad()
            if scheduler is not None:
                scheduler.step()


def zero_grad_inside(model, optimizer, loader, loss_fn, *, epochs, accumulation, scheduler=None, clip_norm=0.0):
    """A refactor that moved zero_grad() into the micro-batch loop: only the last micro-batch's gradient is kept."""
    for _ in range(epochs):
        for window in _windows(loader, accumulation):
            for x, y in window:
                optimizer.zero_grad()
                (loss_fn(model(x), y) / accumulation).backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()


def clip_and_schedule_inside(model, optimizer, loader, loss_fn, *, epochs, accumulation, scheduler=None,
                             clip_norm=0.0):
    """Clipping and the schedule inside the micro-batch loop, without an is-this-the-last guard (Accelerate's
    clip_grad_norm_ inside accumulate() without `sync_gradients`): the running gradient is clipped k times
    and the schedule runs k times too fast."""
    for _ in range(epochs):
        for window in _windows(loader, accumulation):
            for x, y in window:
                (loss_fn(model(x), y) * _rows(y) / sum(_rows(t) for _, t in window)).backward()
                if clip_norm:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
                if scheduler is not None:
                    scheduler.step()
            optimizer.step()
            optimizer.zero_grad()
