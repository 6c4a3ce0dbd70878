"""NoC evaluation: protocol defaults (`defaults`) and the jitted click loop (`engine`)."""
