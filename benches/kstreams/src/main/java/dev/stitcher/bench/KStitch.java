package dev.stitcher.bench;

import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import java.io.File;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import java.util.concurrent.CountDownLatch;
import org.apache.avro.Schema;
import org.apache.avro.generic.GenericDatumReader;
import org.apache.avro.generic.GenericRecord;
import org.apache.avro.io.BinaryDecoder;
import org.apache.avro.io.DecoderFactory;
import org.apache.kafka.common.serialization.Serdes;
import org.apache.kafka.streams.KafkaStreams;
import org.apache.kafka.streams.StreamsConfig;
import org.apache.kafka.streams.Topology;
import org.apache.kafka.streams.processor.api.Processor;
import org.apache.kafka.streams.processor.api.ProcessorContext;
import org.apache.kafka.streams.processor.api.Record;
import org.apache.kafka.streams.state.KeyValueStore;
import org.apache.kafka.streams.state.Stores;

/**
 * The stitching a data team would write in Kafka Streams: identifiers of each event are normalised and
 * united in a union-find kept in a persistent key-value store (identifier to parent, a root holding its
 * component's size); every event produces one record for the component it changed, keyed by the component.
 * Exactly-once v2, one stream thread. Stitching is per task, so the inputs should have one partition.
 *
 * <p>Usage: KStitch brokers application-id output-topic channel_event.avsc input-topic...
 */
public final class KStitch {
  static final String STORE = "identifiers";

  public static void main(String[] args) throws Exception {
    if (args.length < 5) {
      System.err.println("usage: KStitch brokers application-id output-topic schema.avsc input...");
      System.exit(2);
    }
    Schema schema = new Schema.Parser().parse(new File(args[3]));
    List<String> inputs = Arrays.asList(args).subList(4, args.length);

    Topology topology = new Topology();
    topology.addSource("events", Serdes.String().deserializer(), Serdes.ByteArray().deserializer(),
        inputs.toArray(new String[0]));
    topology.addProcessor("stitch", () -> new Stitch(schema), "events");
    topology.addStateStore(
        Stores.keyValueStoreBuilder(Stores.persistentKeyValueStore(STORE), Serdes.String(), Serdes.String()),
        "stitch");
    topology.addSink("components", args[2], Serdes.String().serializer(), Serdes.String().serializer(),
        "stitch");

    Properties p = new Properties();
    p.put(StreamsConfig.BOOTSTRAP_SERVERS_CONFIG, args[0]);
    p.put(StreamsConfig.APPLICATION_ID_CONFIG, args[1]);
    p.put(StreamsConfig.PROCESSING_GUARANTEE_CONFIG, StreamsConfig.EXACTLY_ONCE_V2);
    p.put(StreamsConfig.NUM_STREAM_THREADS_CONFIG, 1);
    p.put(StreamsConfig.STATE_DIR_CONFIG,
        System.getProperty("java.io.tmpdir") + File.separator + "kstitch-" + args[1]);
    p.put(StreamsConfig.consumerPrefix("auto.offset.reset"), "earliest");

    KafkaStreams streams = new KafkaStreams(topology, p);
    CountDownLatch stopped = new CountDownLatch(1);
    streams.setStateListener((now, before) -> {
      if (now == KafkaStreams.State.ERROR || now == KafkaStreams.State.NOT_RUNNING) {
        stopped.countDown();
      }
    });
    Runtime.getRuntime().addShutdownHook(new Thread(() -> {
      streams.close();
      stopped.countDown();
    }));
    streams.start();
    stopped.await();
    if (streams.state() == KafkaStreams.State.ERROR) {
      System.exit(1);
    }
  }

  /** Union-find over the store: ">parent" for a child, "=size" for a root. */
  static final class Stitch implements Processor<String, byte[], String, String> {
    private final ObjectMapper json = new ObjectMapper();
    private final GenericDatumReader<GenericRecord> avro;
    private BinaryDecoder decoder;
    private ProcessorContext<String, String> context;
    private KeyValueStore<String, String> store;
    private long skipped;

    Stitch(Schema schema) {
      this.avro = new GenericDatumReader<>(schema);
    }

    @Override
    public void init(ProcessorContext<String, String> context) {
      this.context = context;
      this.store = context.getStateStore(STORE);
    }

    @Override
    public void process(Record<String, byte[]> record) {
      List<String> ids = new ArrayList<>();
      String eventId;
      try {
        eventId = decode(record.value(), ids);
      } catch (Exception e) {
        // Malformed input: what the pipeline sends to its dead-letter topic.
        skipped++;
        return;
      }
      if (ids.isEmpty()) {
        return;
      }
      Map<String, Long> roots = new LinkedHashMap<>();
      for (String id : ids) {
        String v = store.get(id);
        if (v == null) {
          store.put(id, "=1");
          roots.putIfAbsent(id, 1L);
        } else {
          String root = find(id, v);
          roots.putIfAbsent(root, Long.parseLong(store.get(root).substring(1)));
        }
      }
      String big = null;
      long total = 0;
      for (Map.Entry<String, Long> r : roots.entrySet()) {
        total += r.getValue();
        if (big == null || r.getValue() > roots.get(big)) {
          big = r.getKey();
        }
      }
      if (roots.size() > 1) {
        for (String r : roots.keySet()) {
          if (!r.equals(big)) {
            store.put(r, ">" + big);
          }
        }
        store.put(big, "=" + total);
      }
      String out = "{\"component\":" + json.valueToTree(big) + ",\"identifiers\":" + total
          + ",\"event_id\":" + json.valueToTree(eventId) + "}";
      context.forward(new Record<>(big, out, record.timestamp()));
    }

    /** The root of {@code id} (whose stored value is {@code v}), halving the path on the way. */
    private String find(String id, String v) {
      String node = id;
      List<String> path = new ArrayList<>();
      while (v.charAt(0) == '>') {
        path.add(node);
        node = v.substring(1);
        v = store.get(node);
      }
      for (int i = 0; i + 1 < path.size(); i++) {
        store.put(path.get(i), ">" + node);
      }
      return node;
    }

    private String decode(byte[] bytes, List<String> ids) throws Exception {
      if (bytes.length > 5 && bytes[0] == 0) {
        decoder = DecoderFactory.get().binaryDecoder(bytes, 5, bytes.length - 5, decoder);
        GenericRecord e = avro.read(null, decoder);
        for (Object o : (List<?>) e.get("identifiers")) {
          GenericRecord id = (GenericRecord) o;
          add(ids, id.get("type").toString(), id.get("value").toString());
        }
        return e.get("event_id").toString();
      }
      JsonNode e = json.readTree(bytes);
      for (JsonNode id : e.get("identifiers")) {
        add(ids, id.get("type").asText(), id.get("value").asText());
      }
      return e.get("event_id").asText();
    }

    private static void add(List<String> ids, String type, String value) {
      String v = value.trim();
      switch (type) {
        case "email" -> v = v.toLowerCase();
        case "phone" -> v = v.replaceAll("[^0-9+]", "");
        default -> { }
      }
      if (!v.isEmpty()) {
        ids.add(type + ":" + v);
      }
    }
  }
}
