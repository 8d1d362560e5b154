"""The offline side: one module per training stage. Reads snapshots, never the studio's store."""
