"""prunelab: iterative magnitude pruning with real or synthetic data, and the stability analysis of
the subnetworks it finds (linear mode connectivity, loss landscapes, Hessians). Pure PyTorch."""

__version__ = "0.1.0"
