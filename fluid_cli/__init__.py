"""fluid: turn a pretrained causal LM into a parallel decoder with the FLUID method."""

__version__ = "0.1.0"
