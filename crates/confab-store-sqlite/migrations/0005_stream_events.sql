-- Resumable streams (SPEC §14): where each token event ends in a message's
-- text (LEB128 byte lengths, one after the other), saved with the text, so a
-- replay from the database gives every token its original event id. NULL for
-- messages stored before: replayed as one event.
ALTER TABLE messages ADD COLUMN event_lengths BLOB;
