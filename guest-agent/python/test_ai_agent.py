"""Tests of ai_agent.py against an agent daemon over the fake device.

Run by guest-agent/tests/python.rs, which starts the daemon and sets
AI_AGENT_LIBRARY (the built libguest_agent.so) and AI_AGENT_SOCKET. The fake device's
models: 1 "double" (f32 [1, 1..1024] -> twice the input) and 2 "text-stats"
(u8 text [1..4096] -> f32 [1, 4]: length, byte sum, first byte, last byte).
"""

import os
import sys
import unittest

try:
    import numpy as np
except ImportError:
    print("SKIP: numpy is not installed (pip install numpy)")
    sys.exit(0)

import ai_agent


def open_agent():
    return ai_agent.Agent(mode="daemon", socket=os.environ["AI_AGENT_SOCKET"], session_mb=2)


class AgentTest(unittest.TestCase):
    def setUp(self):
        self.agent = open_agent()

    def tearDown(self):
        self.agent.close()

    def test_models_list_the_signatures(self):
        models = {m.name: m for m in self.agent.ai_models()}
        self.assertEqual(set(models), {"double", "text-stats"})
        d = models["double"]
        self.assertEqual((d.id, d.inputs[0].name, d.inputs[0].dtype), (1, "x", "f32"))
        self.assertEqual(d.inputs[0].dims, [(1, 1), (1, 1024)])
        t = models["text-stats"]
        self.assertEqual((t.inputs[0].dtype, t.outputs[0].dtype, t.outputs[0].dims), ("u8", "f32", [(1, 1), (4, 4)]))
        self.assertEqual(self.agent.find_model(2).name, "text-stats")
        with self.assertRaises(KeyError):
            self.agent.find_model("nope")

    def test_alloc_gives_device_memory_seen_through_numpy(self):
        buf = self.agent.ai_alloc(64, zero=True)
        self.assertGreaterEqual(len(buf), 64)
        self.assertEqual(buf.bytes(8), b"\0" * 8)
        view = buf.array(np.float32, (2, 2))
        view[...] = [[1.5, 2.0], [3.0, -1.0]]
        self.assertEqual(buf.bytes(16), np.array([1.5, 2.0, 3.0, -1.0], dtype=np.float32).tobytes())
        with self.assertRaises(ValueError):
            buf.array(np.float64, (len(buf),))

    def test_infer_copies_ordinary_arrays_once(self):
        x = np.array([[0.5, -2.0, 8.0]], dtype=np.float32)
        r = self.agent.ai_infer("double", [x]).raise_for_status()
        self.assertEqual(self.agent.copies, 1)
        self.assertEqual(r.status_name, "OK")
        self.assertEqual(r.outputs[0].shape, (1, 3))
        np.testing.assert_array_equal(r.outputs[0], x * 2)

    def test_agent_arrays_go_in_and_come_out_without_copies(self):
        x = self.agent.empty((1, 4), np.float32)
        x[...] = [[1, 2, 3, 4]]
        out = self.agent.ai_alloc(4096)
        r = self.agent.ai_infer("double", [x], outputs=[out]).raise_for_status()
        self.assertEqual(self.agent.copies, 0)
        y = r.outputs[0]
        # The result is a view of the output buffer the device wrote.
        self.assertEqual(y.__array_interface__["data"][0], out.address)
        np.testing.assert_array_equal(y, [[2, 4, 6, 8]])
        # Reusing the input buffer: the device reads the new values in place.
        x[...] = [[10, 20, 30, 40]]
        r = self.agent.ai_infer("double", [x], outputs=[out]).raise_for_status()
        np.testing.assert_array_equal(r.outputs[0], [[20, 40, 60, 80]])
        self.assertEqual(self.agent.copies, 0)

    def test_text_model_takes_utf8_bytes(self):
        text = "héllo".encode()
        r = self.agent.ai_infer("text-stats", [np.frombuffer(text, dtype=np.uint8)], priority="interactive", deadline_us=50000)
        r.raise_for_status()
        np.testing.assert_array_equal(r.outputs[0], [[len(text), sum(text), text[0], text[-1]]])

    def test_device_statuses_are_results(self):
        r = self.agent.ai_infer("double", [np.zeros((1, 4), dtype=np.float64)])
        self.assertFalse(r.ok)
        self.assertEqual(r.status_name, "BAD_TENSOR")
        self.assertEqual(r.outputs, [])
        with self.assertRaises(ai_agent.StatusError):
            r.raise_for_status()
        with self.assertRaises(ValueError):
            self.agent.ai_infer("double", [np.zeros((1, 2), dtype=np.complex64)])

    def test_bad_handles_raise(self):
        with self.assertRaises(ai_agent.AgentError) as e:
            ai_agent.Agent(mode="daemon", socket="/nonexistent/agent.sock", connect_timeout_s=1)
        self.assertEqual(e.exception.code, -4)


if __name__ == "__main__":
    result = unittest.main(exit=False, verbosity=2).result
    print(f"{result.testsRun - len(result.failures) - len(result.errors)} passed, {len(result.failures) + len(result.errors)} failed")
    sys.exit(0 if result.wasSuccessful() else 1)
