"""sam_edu."""
