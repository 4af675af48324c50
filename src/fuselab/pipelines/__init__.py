"""End-to-end pipelines: ``fuselab fuse`` runs the FuseChat stages from sources to a fused model and report."""
