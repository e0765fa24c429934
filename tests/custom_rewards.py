"""A user's own reward, named in a pipeline as `grpo:tests.custom_rewards:brevity` (module:function).

Ray hands the driver's working directory (the repository root under pytest) to every worker, so a
module path from there imports in the workers too, as a user's own module beside their configs does."""


def brevity(ctx):
    """Shorter completions score higher. It needs no parsed number, so it varies even for a policy
    that has not learned the answer format yet; it also proves the dataset's columns arrive."""
    missing = {"target", "region", "id"} - set(ctx.columns)
    if missing:
        raise KeyError(f"reward context lacks the dataset columns {sorted(missing)}")
    if [len(v) for v in ctx.columns["region"]] and len(ctx.columns["region"]) != len(ctx.texts):
        raise ValueError("one region per prompt expected")
    return [[-len(text) / 32.0 for text in group] for group in ctx.texts]
