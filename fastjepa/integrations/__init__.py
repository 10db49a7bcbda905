"""One-call integrations: swap the slow pieces of someone else's JEPA code for fastjepa's.

::

    import fastjepa.integrations.ijepa;  fastjepa.integrations.ijepa.apply()    # facebookresearch/ijepa
    import fastjepa.integrations.vjepa2; fastjepa.integrations.vjepa2.apply()   # facebookresearch/vjepa2
    import fastjepa.integrations.mae;    fastjepa.integrations.mae.apply()      # facebookresearch/mae
    import fastjepa.integrations.transformers; fastjepa.integrations.transformers.apply()  # HF VJEPA2Model / IJepaModel

Each ``apply()`` patches the codebase's modules already imported in the process (classes
in place, module-level functions wherever they were imported to), takes one flag per
swapped piece, returns the list of what it patched and refuses, naming what it expected
and found, when the imported package is not that codebase. ``revert()`` puts every
original object back. The submodules are imported on demand: ``import fastjepa`` stays light
(and never imports transformers: only ``transformers.apply()`` does).
"""

__all__ = ["ijepa", "mae", "transformers", "vjepa2"]
