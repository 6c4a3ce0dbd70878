"""NoC evaluation: protocol defaults (`defaults`) the jitted click
protocol (`protocol`), the host-side scheduling of samples onto it (`scheduler`), the reports
(`evaluate`) and the command line (`cli`)."""
