#!/usr/bin/env bash
# Starts PulseAudio (if it is not running) with a null sink `virtmic` whose
# monitor is the default source, so `stepaudio-live --mic` records whatever
# is played into it: `paplay --device=virtmic speech.wav`. ALSA's `default`
# device reaches PulseAudio through libasound2-plugins. With
# PULSE_RUNTIME_PATH set to a directory of its own it starts (and sets up)
# a private PulseAudio there, which only the processes given the same
# variable use (tests/faults.rs).
set -euo pipefail
if ! pactl info >/dev/null 2>&1; then
  # As root PulseAudio warns but runs; --exit-idle-time=-1 keeps it up between tests.
  pulseaudio -D --exit-idle-time=-1 --log-target=stderr 2>/dev/null || pulseaudio -D --exit-idle-time=-1
  for _ in $(seq 50); do pactl info >/dev/null 2>&1 && break; sleep 0.1; done
fi
pactl list short sinks | grep -q '^[0-9]*\s*virtmic\s' ||
  pactl load-module module-null-sink sink_name=virtmic sink_properties=device.description=VirtualMic >/dev/null
pactl set-default-sink virtmic
pactl set-default-source virtmic.monitor
# An idle source is suspended and loses the first moments of new audio.
pactl unload-module module-suspend-on-idle 2>/dev/null || true
# With no fallback sink, unloading `virtmic` really removes the microphone
# (tests/faults.rs does that): otherwise PulseAudio moves the recording to
# the fallback `auto_null.monitor` and capture goes on, silent but unbroken.
pactl unload-module module-always-sink 2>/dev/null || true
pactl info | grep -E '^Default (Sink|Source)'
