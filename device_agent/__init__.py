"""The Diffcast device agent: poll, download, verify, apply patch chains crash-safely, report."""
