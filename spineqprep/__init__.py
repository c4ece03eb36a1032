"""spineqprep: a BIDS-App for quantitative MRI of the lumbar spine."""

__version__ = "0.1.0"
