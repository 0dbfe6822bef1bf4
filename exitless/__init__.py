"""exitless: a VMM on Linux KVM whose devices live in memory shared with a polling sidecore."""
__version__ = "0.1.0"
