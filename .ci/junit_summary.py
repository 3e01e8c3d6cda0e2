"""Fail unless a pytest JUnit report shows tests that ran and none that failed.

    python3 .ci/junit_summary.py REPORT.xml [LABEL]
"""
import sys
import xml.etree.ElementTree as ET

root = ET.parse(sys.argv[1]).getroot()
label = sys.argv[2] if len(sys.argv) > 2 else "ci"
suites = [root] if root.tag == "testsuite" else list(root)
total = sum(int(s.get("tests", 0)) for s in suites)
skipped = sum(int(s.get("skipped", 0)) for s in suites)
bad = sum(int(s.get("failures", 0)) + int(s.get("errors", 0)) for s in suites)
ran = total - skipped
print(f"{label}: {ran} ran, {skipped} skipped, {bad} failed or errored")
if ran == 0 or bad:
    sys.exit(f"{label}: no test ran" if ran == 0 else f"{label}: failures")
