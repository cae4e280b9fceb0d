"""discoalign: preference alignment with Disco (Normal) rewards and dynamic beta."""

__version__ = "0.1.0"
